"""Text datasets (calibration and evaluation): UTF-8 plain text, or JSON Lines with a "text" field."""
from __future__ import annotations

import json
from pathlib import Path

from shared.errors import InvalidArgument

MEDIA_TYPES = {".txt": "text/plain; charset=utf-8", ".jsonl": "application/jsonl"}


def load_text(path: Path, field: str = "dataset") -> str:
    """The dataset's text. JSON Lines are joined with blank lines between records."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"{field} is not UTF-8 text (byte {error.start}: {error.reason})", field=field)
    if text.lstrip().startswith("{"):
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidArgument(f"{field} line {number} is not JSON: {error.msg}", field=field)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InvalidArgument(f"{field} line {number} has no string field \"text\"", field=field)
            records.append(record["text"])
        text = "\n\n".join(records)
    if not text.strip():
        raise InvalidArgument(f"{field} is empty", reason="INSUFFICIENT_DATA", field=field)
    return text
