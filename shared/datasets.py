"""Datasets (calibration and evaluation), text or token ids.

Text:
- UTF-8 plain text;
- JSON Lines whose records have a string field "text" (joined with a blank line between records).

Token ids (calibration only; `load_tokens` reads them, `load_text` refuses them):
- JSON Lines whose records have a field "tokens": a list of integer token ids; the records' ids are
  concatenated into one stream, in file order, with nothing in between;
- a text file whose first line is exactly `#edgeforge-token-ids`, then token ids as decimal integers
  separated by any whitespace (spaces, newlines), e.g.

      #edgeforge-token-ids
      504 3458 282 2347
      30 216

Token ids are the model's vocabulary indices without BOS (the calibrator adds BOS itself). Every id
is checked: a non-integer, a negative id, or (given the vocabulary size) an id ≥ vocab_size is an
InvalidArgument naming the field, the line and the id. A JSON Lines file holds text records or token
records, never both.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from shared.errors import InvalidArgument

MEDIA_TYPES = {".txt": "text/plain; charset=utf-8", ".jsonl": "application/jsonl"}
TOKEN_IDS_MAGIC = "#edgeforge-token-ids"
_INTEGER = re.compile(r"-?[0-9]+")


def load_text(path: Path, field: str = "dataset") -> str:
    """The dataset's text. JSON Lines are joined with blank lines between records."""
    text = _decode(path, field)
    if _is_token_ids(text):
        raise InvalidArgument(f"{field} holds token ids ({TOKEN_IDS_MAGIC}), not text", field=field)
    if _is_json_lines(text):
        records = _json_records(text, field)
        if _record_kind(records, field) == "tokens":
            raise InvalidArgument(f"{field} holds token ids (JSON Lines with \"tokens\"), not text", field=field)
        text = "\n\n".join(record["text"] for _, record in records)
    if not text.strip():
        raise InvalidArgument(f"{field} is empty", reason="INSUFFICIENT_DATA", field=field)
    return text


def load_tokens(path: Path, encode: Callable[[str], list[int]], *, vocab_size: int | None = None,
                field: str = "dataset") -> list[int]:
    """The dataset as one stream of token ids: token-id files as they are, text through `encode`.

    With `vocab_size`, ids outside [0, vocab_size) are refused (text is encoded by the model's own
    tokenizer, so its ids are checked the same way)."""
    text = _decode(path, field)
    if _is_token_ids(text):
        tokens = _parse_token_lines(text, field, vocab_size)
    elif _is_json_lines(text) and _record_kind(records := _json_records(text, field), field) == "tokens":
        tokens = _token_records(records, field, vocab_size)
    else:
        tokens = encode(load_text(path, field))
        check_token_ids(tokens, vocab_size, field)
    if not tokens:
        raise InvalidArgument(f"{field} holds no token ids", reason="INSUFFICIENT_DATA", field=field)
    return tokens


def check_token_ids(tokens: list[int], vocab_size: int | None, field: str) -> None:
    """Refuses ids outside [0, vocab_size), naming the first one and its position in the stream."""
    for position, token in enumerate(tokens):
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise InvalidArgument(f"{field} token {position} has id {token}, outside the model's vocabulary "
                                  f"[0, {vocab_size})", field=field)


# ---------------------------------------------------------------- parsing

def _decode(path: Path, field: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"{field} is not UTF-8 text (byte {error.start}: {error.reason})", field=field)


def _is_token_ids(text: str) -> bool:
    first_line = text.lstrip("\ufeff").split("\n", 1)[0]
    return first_line.rstrip("\r") == TOKEN_IDS_MAGIC


def _is_json_lines(text: str) -> bool:
    return text.lstrip().startswith("{")


def _json_records(text: str, field: str) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidArgument(f"{field} line {number} is not JSON: {error.msg}", field=field)
        if not isinstance(record, dict):
            raise InvalidArgument(f"{field} line {number} is not a JSON object", field=field)
        records.append((number, record))
    return records


def _record_kind(records: list[tuple[int, dict]], field: str) -> str:
    """"text" or "tokens", the same for every record."""
    kind = None
    for number, record in records:
        if isinstance(record.get("text"), str):
            this = "text"
        elif "tokens" in record:
            this = "tokens"
        else:
            raise InvalidArgument(f"{field} line {number} has no string field \"text\" and no field \"tokens\"",
                                  field=field)
        if kind is not None and this != kind:
            raise InvalidArgument(f"{field} line {number} has \"{this}\" but earlier lines have \"{kind}\"; a "
                                  "dataset holds text or token ids, not both", field=field)
        kind = this
    return kind or "text"


def _token_records(records: list[tuple[int, dict]], field: str, vocab_size: int | None) -> list[int]:
    tokens: list[int] = []
    for number, record in records:
        ids = record["tokens"]
        if not isinstance(ids, list):
            raise InvalidArgument(f"{field} line {number}: \"tokens\" must be a list of integers, got "
                                  f"{type(ids).__name__}", field=field)
        for item in ids:
            if not isinstance(item, int) or isinstance(item, bool):
                raise InvalidArgument(f"{field} line {number}: token id {json.dumps(item)[:40]} is not an integer",
                                      field=field)
            _check_id(item, vocab_size, field, number)
        tokens.extend(ids)
    return tokens


def _parse_token_lines(text: str, field: str, vocab_size: int | None) -> list[int]:
    tokens: list[int] = []
    for number, line in enumerate(text.splitlines()[1:], 2):
        for item in line.split():
            if not _INTEGER.fullmatch(item):
                raise InvalidArgument(f"{field} line {number}: {item[:40]!r} is not a token id (a decimal "
                                      "integer)", field=field)
            token = int(item)
            _check_id(token, vocab_size, field, number)
            tokens.append(token)
    return tokens


def _check_id(token: int, vocab_size: int | None, field: str, line: int) -> None:
    if token < 0:
        raise InvalidArgument(f"{field} line {line}: token id {token} is negative", field=field)
    if vocab_size is not None and token >= vocab_size:
        raise InvalidArgument(f"{field} line {line}: token id {token} is outside the model's vocabulary "
                              f"[0, {vocab_size})", field=field)
