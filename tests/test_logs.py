"""Log lines: one per event, fields visible in both formats."""

from __future__ import annotations

import io
import json
import logging

from proxy.logs import configure_logging


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
    assert "level=warning" in lines[0]
    assert "outcome=connect_error" in lines[0]
    assert "reason='connection refused'" in lines[0]
