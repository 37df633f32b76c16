"""AIP-158 pagination for List RPCs: page_size with a default and a cap, opaque page tokens."""
from __future__ import annotations

from shared.errors import InvalidArgument

MAX_PAGE_SIZE = 1000


def page(page_size: int, page_token: str, default: int) -> tuple[int, int]:
    """-> (size, offset). The token is the offset this server issued as next_page_token."""
    size = page_size or default
    if not 0 < size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {page_size}", field="page_size")
    if page_token and not page_token.isdigit():
        raise InvalidArgument(f"page_token {page_token[:40]!r} is not one this server issued", field="page_token")
    return size, int(page_token or 0)


def next_token(offset: int, size: int, fetched: int) -> str:
    """The next page's token, given `fetched` rows read with limit size + 1."""
    return str(offset + size) if fetched > size else ""
