"""Log setup: one line per event, as text (logfmt-like) or JSON, for `kubectl logs` and collectors.

Call sites pass structured fields through `extra={"fields": {...}}`, so both formats show them
without parsing the message.
"""

from __future__ import annotations

import json
import logging
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


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), f"level={record.levelname.lower()}", f"msg={record.getMessage()!r}"]
        for key, value in _fields(record).items():
            text = str(value)
            parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
        if record.exc_info:
            parts.append(f"error={self.formatException(record.exc_info)!r}")
        return " ".join(parts)


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
