r"""Log setup: one line per event, as logfmt text or JSON, for `kubectl logs` and collectors.

Call sites pass structured fields through `extra={"fields": {...}}`, so both formats show them
without parsing the message.

The text format is logfmt as go-logfmt writes it (and Loki, Grafana and logfmt tools read it):
`ts=... level=... msg=...` and then the fields, a value bare unless it holds a space, a control
character, `=` or `"`, or is empty; then it is double-quoted, with `\\ \" \n \r \t` and `\u00XX`
escapes, so every event, a traceback too, stays one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

LOGGER_NAME = "proxy"


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


# go-logfmt's rule: a value holding any of these is quoted (U+FFFD stands for bytes that were
# not UTF-8 there, so a reader cannot take it for a bare value either).
_NEEDS_QUOTES = re.compile(r'[\x00-\x20="\x7f\ufffd]')
_ESCAPED = re.compile(r'[\x00-\x1f"\\\x7f]')
_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A key is a run of characters above space other than `=` and `"`; anything else becomes `_`.
_NOT_IN_KEY = re.compile(r'[\x00-\x20="\x7f]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def logfmt_value(value: object) -> str:
    """One value as logfmt writes it: bare when it can be, else quoted and escaped. An empty
    value is written `""` rather than nothing: every reader takes that for the empty string,
    while some take a bare `key=` for a flag."""
    text = str(value)
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"' + _ESCAPED.sub(_escape, text) + '"'


def logfmt_key(key: object) -> str:
    return _NOT_IN_KEY.sub("_", str(key)) or "_"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        pairs: list[tuple[object, object]] = [
            ("ts", _timestamp(record)),
            ("level", record.levelname.lower()),
            ("msg", record.getMessage()),
            *_fields(record).items(),
        ]
        if record.exc_info:
            pairs.append(("error", self.formatException(record.exc_info)))
        return " ".join(f"{logfmt_key(key)}={logfmt_value(value)}" for key, value in pairs)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class QuietBadRequests(logging.Filter):
    """aiohttp logs a malformed request from a client (an oversized or garbled head) as an ERROR
    with a traceback, which lets any client fill the log. It becomes one debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        reason = " ".join(str(error.message).split())[:200] if error.message else type(error).__name__
        record.msg = "rejected a malformed request"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.fields = {"status": error.code, "reason": reason}  # type: ignore[attr-defined]
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own loggers are chatty at info (access log) and we log upstream failures ourselves.
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    quiet_bad_requests()


def quiet_bad_requests() -> None:
    """Install QuietBadRequests on aiohttp's server logger, once."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietBadRequests) for f in server.filters):
        server.addFilter(QuietBadRequests())
