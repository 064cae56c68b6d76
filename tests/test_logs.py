"""Log lines: one per event, fields visible in both formats; the text format read back by a
logfmt parser (logfmtkv, in strict mode: it accepts exactly what go-logfmt accepts)."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.logs import TextFormatter, configure_logging
from tests.conftest import require_module


def emit(fmt: str) -> str:
    stream = io.StringIO()
    configure_logging("info", fmt, stream)
    logging.getLogger("proxy.test").warning(
        "upstream request %s",
        "connect_error",
        extra={"fields": {"outcome": "connect_error", "reason": "connection refused"}},
    )
    logging.getLogger("proxy.test").debug("not shown at info")
    return stream.getvalue()


def test_json_lines() -> None:
    lines = emit("json").splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["level"] == "warning"
    assert doc["msg"] == "upstream request connect_error"
    assert doc["reason"] == "connection refused"
    assert doc["ts"].endswith("Z")


def test_text_lines() -> None:
    lines = emit("text").splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ts=")
    assert ' level=warning msg="upstream request connect_error" outcome=connect_error ' in lines[0]
    assert lines[0].endswith(' reason="connection refused"')


def parse_logfmt(line: str) -> dict[str, Any]:
    logfmtkv = require_module("logfmtkv")
    pairs = logfmtkv.parse_pairs(line, strict=True)
    keys = [pair.key for pair in pairs]
    assert len(keys) == len(set(keys)), line
    return {pair.key: pair.value for pair in pairs}


AWKWARD = {
    "space": "connection refused",
    "quotes": 'exporter said "busy"',
    "backslash": "C:\\Program Files\\windows_exporter\\",
    "backslash_bare": "C:\\tmp",
    "trailing_backslash": "a\\",
    "newline": "line one\nline two\r\n",
    "tab": "a\tb",
    "equals": "a=b",
    "only_equals": "=",
    "empty": "",
    "control": "\x00\x01\x1b\x7f",
    "escaped_looking": '\\n is not a newline, \\" is not a quote',
    "unicode": "Zürich, 東京, \ufffd",
    "plain": "connect_error",
    "number": 3,
    "none": None,
}


def test_a_logfmt_parser_reads_every_text_line_back() -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream)
    log = logging.getLogger("proxy.test")
    log.warning('a message with "quotes", a = and\na newline', extra={"fields": AWKWARD})
    log.info("plain")
    try:
        raise ValueError('bad "value"\nsecond line')
    except ValueError:
        log.exception("failed", extra={"fields": {"outcome": "body_error"}})
    lines = stream.getvalue().split("\n")
    assert lines.pop() == ""  # every event ends in exactly one newline...
    assert len(lines) == 3  # ...and has no other, the traceback too
    first, second, third = (parse_logfmt(line) for line in lines)

    assert list(first)[:3] == ["ts", "level", "msg"]
    assert first["ts"].endswith("Z")
    assert first["level"] == "warning"
    assert first["msg"] == 'a message with "quotes", a = and\na newline'
    assert {key: first[key] for key in AWKWARD} == {key: str(value) for key, value in AWKWARD.items()}
    assert second == {"ts": second["ts"], "level": "info", "msg": "plain"}
    assert third["outcome"] == "body_error"
    assert third["error"].startswith("Traceback (most recent call last):\n")
    assert third["error"].endswith('ValueError: bad "value"\nsecond line')


# Field names are the code's own, plain words; values come from anywhere (a reason text, an
# exporter's answer, a user's header) and may hold anything but lone surrogates.
KEYS = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
    lambda key: key not in ("ts", "level", "msg")
)
VALUES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # also messages


@settings(max_examples=300, deadline=None)
@given(VALUES, st.dictionaries(KEYS, VALUES, max_size=5))
def test_any_message_and_field_values_round_trip(message: str, fields: dict[str, str]) -> None:
    record = logging.makeLogRecord({"msg": message, "levelname": "INFO", "fields": fields})
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert "\r" not in line
    parsed = parse_logfmt(line)
    assert parsed == {"ts": parsed["ts"], "level": "info", "msg": message, **fields}


def test_keys_that_logfmt_cannot_hold_are_mended() -> None:
    record = logging.makeLogRecord({"msg": "m", "levelname": "INFO", "fields": {"a b": 1, 'q"=': 2, "": 3}})
    parsed = parse_logfmt(TextFormatter().format(record))
    assert {key: parsed[key] for key in ("a_b", "q__", "_")} == {"a_b": "1", "q__": "2", "_": "3"}
