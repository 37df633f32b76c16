"""shared/logs.py: JSON lines that a log shipper can parse, context fields, redaction, and configuration."""
from __future__ import annotations

import datetime
import io
import json
import logging
import threading
import warnings

import pytest

from shared import logs


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_object_on_one_line_with_the_fields(json_logs):
    log = logging.getLogger("services.coordinator.pipeline")
    log.info("first line\nsecond line with \"quotes\" and ünïcode")
    log.debug("%d candidates", 3, extra={"duration_ms": 1.5, "code": "OK"})
    first, second = lines(json_logs)
    assert json_logs.getvalue().count("\n") == 2                      # the newline in the message is escaped
    assert first["message"] == "first line\nsecond line with \"quotes\" and ünïcode"
    assert (first["level"], first["logger"], first["service"]) == ("INFO", "services.coordinator.pipeline",
                                                                   "coordinator")
    ts = datetime.datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))  # RFC 3339 in UTC
    assert first["ts"].endswith("Z") and ts.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - ts).total_seconds()) < 60
    assert second["message"] == "3 candidates" and second["level"] == "DEBUG"
    assert (second["duration_ms"], second["code"]) == (1.5, "OK")


def test_an_exception_is_a_traceback_string_in_the_same_object(json_logs):
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("x").exception("build crashed")
    (record,) = lines(json_logs)
    assert record["level"] == "ERROR" and record["message"] == "build crashed"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in record["exception"]


def test_context_fields_are_scoped_and_per_thread(json_logs):
    log = logging.getLogger("x")
    with logs.fields(build="builds/b-1", candidate="gguf-q4_0"):
        log.info("inside")
        with logs.fields(candidate=None, device="devices/pixel-8"):       # None removes a field
            log.info("nested")
        seen = []
        thread = threading.Thread(target=lambda: (log.info("other thread"), seen.append(logs.current())))
        thread.start()
        thread.join()
    log.info("outside")
    inside, nested, other, outside = lines(json_logs)
    assert (inside["build"], inside["candidate"]) == ("builds/b-1", "gguf-q4_0")
    assert nested["device"] == "devices/pixel-8" and "candidate" not in nested and nested["build"] == "builds/b-1"
    assert "build" not in other and seen == [{}]                    # a new thread starts with no fields
    assert "build" not in outside and logs.current() == {}


def test_secrets_are_redacted_from_messages_extras_and_tracebacks(json_logs):
    secret = "ef_" + "Zk3_q-" * 7
    log = logging.getLogger("x")
    log.warning("token %s refused; header was 'Bearer %s'", secret, secret, extra={"header": f"Bearer {secret}"})
    try:
        raise ValueError(f"bad {secret}")
    except ValueError:
        log.exception("failed")
    text = json_logs.getvalue()
    assert secret not in text and secret[3:] not in text
    warning, failed = lines(json_logs)
    assert "ef_<redacted>" in warning["message"] and "Bearer <redacted>" in warning["message"]
    assert warning["header"] == "Bearer <redacted>" and "ef_<redacted>" in failed["exception"]
    assert logs.redact("token id abcdefgh, ef_short") == "token id abcdefgh, ef_short"   # ids are not secrets
    prose = "unknown bearer token: no token of this coordinator has that secret"
    assert logs.redact(prose) == prose


def test_text_format_is_one_readable_line_with_the_context():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(logs.ContextFilter("calibrator"))
    log = logging.getLogger("test_logs.text")
    log.addHandler(handler)
    log.propagate = False
    try:
        with logs.fields(rpc="/edgeforge.v1.Calibrator/Calibrate"):
            log.warning("slow %s", "ef_" + "s" * 40)
    finally:
        log.removeHandler(handler)
    line = stream.getvalue().rstrip("\n")
    assert "\n" not in line and " calibrator WARNING slow ef_<redacted> " in line
    assert line.endswith("[rpc=/edgeforge.v1.Calibrator/Calibrate]")


def test_configure_replaces_its_handler_and_logs_warnings_as_json(json_logs):
    logs.configure("json", "info", service="agent", stream=json_logs)   # again: still one handler
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("x").debug("not at info")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old option", UserWarning)
    (record,) = lines(json_logs)
    assert record["logger"] == "py.warnings" and "an old option" in record["message"]
    assert record["service"] == "agent"


def test_formats_and_levels_come_from_flags_then_the_environment(monkeypatch):
    monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    assert logs.parse_format(None) == "text" and logs.parse_level(None) == logging.INFO
    monkeypatch.setenv(logs.FORMAT_ENV, "JSON")
    monkeypatch.setenv(logs.LEVEL_ENV, "warning")
    assert logs.parse_format(None) == "json" and logs.parse_level(None) == logging.WARNING
    assert logs.parse_format("text") == "text" and logs.parse_level("Debug") == logging.DEBUG
    monkeypatch.setenv(logs.FORMAT_ENV, "yaml")
    with pytest.raises(ValueError, match=r"\$EDGEFORGE_LOG_FORMAT must be one of text, json, got 'yaml'"):
        logs.parse_format(None)
    with pytest.raises(ValueError, match="--log-level must be one of debug, info, warning, error, critical"):
        logs.parse_level("verbose")
