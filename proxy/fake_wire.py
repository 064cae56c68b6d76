"""How the fake exporter frames a body on the wire: the way Go's net/http sends windows_exporter's.

Measured here against Debian's prometheus-node-exporter 1.5.0 (client_golang's promhttp, the HTTP
stack windows_exporter has too), by reading its raw answers on 127.0.0.1:

- A body is sent `Transfer-Encoding: chunked` with no Content-Length, plain or gzip. (Go sets
  Content-Length only when the handler finished before its 2048-byte response buffer filled, so
  short answers, such as a 503's text, carry one.)
- Chunks are 2048 bytes, that buffer filling, with a shorter last one: a 57,600-byte body came as
  27 chunks of 2048, one of 2206 (a single large write that went past the empty buffer) and one of
  98; its gzip as 4 of 2048 and one of 1259.
- A chunk's size line, its data and its closing CRLF are three writes into the connection's 4 KiB
  buffer, which goes to the socket whenever it fills: the reads arrived in multiples of 4096
  bytes. A TCP segment may therefore end anywhere in the framing, between a chunk's data and its
  CRLF included.

Where this differs from Go: the rare larger chunk is not reproduced (every chunk is 2048 bytes but
the last), and `Framing.SPLIT` exaggerates the data/CRLF split with a pause after every chunk, which
a real network does only now and then.
"""

from __future__ import annotations

import enum
import functools

GO_CHUNK_BYTES = 2048  # net/http's response buffer (bufferBeforeChunkingSize)
GO_FLUSH_BYTES = 4096  # net/http's connection write buffer
LAST_CHUNK = b"0\r\n\r\n"


class Framing(enum.StrEnum):
    """How the fake exporter sends a body."""

    GO = "go"  # chunked in 2048-byte chunks, written in 4 KiB pieces, as windows_exporter does
    SPLIT = "split"  # chunked as GO, each chunk's data and its CRLF written apart, a pause between
    CONTENT_LENGTH = "content-length"  # one write with Content-Length, as the oldest exporters (v0.16)


def frame(data: bytes) -> bytes:
    """One HTTP chunk: size line, data, CRLF."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def go_chunks(data: bytes) -> list[bytes]:
    """`data` cut where Go's 2048-byte response buffer would cut it."""
    return [data[offset : offset + GO_CHUNK_BYTES] for offset in range(0, len(data), GO_CHUNK_BYTES)]


@functools.lru_cache(maxsize=64)
def go_wire(body: bytes) -> bytes:
    """The whole chunked body as Go sends it, the last chunk included.

    Cached: the fake answers the same few bodies over and over, and a benchmark must measure the
    proxy, not this framing.
    """
    return b"".join(map(frame, go_chunks(body))) + LAST_CHUNK


def chunk_ends(wire: bytes) -> list[int]:
    """Offsets in a chunked `wire` where each chunk's data ends and its CRLF begins."""
    ends = []
    offset = 0
    while True:
        line_end = wire.index(b"\r\n", offset)
        size = int(wire[offset:line_end].split(b";", 1)[0], 16)
        if size == 0:
            return ends
        ends.append(line_end + 2 + size)
        offset = line_end + 2 + size + 2
