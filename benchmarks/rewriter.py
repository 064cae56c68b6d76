"""The rewriter alone, in-process, pinned to one core: samples per second with a cold and a warm cache."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

CHUNK = 64 * 1024

KEEP_LIST_REGEX = (
    "windows_cpu_time_total|windows_logical_disk_free_bytes|windows_logical_disk_size_bytes|"
    "windows_memory_.*|windows_net_bytes_received_total|windows_net_bytes_sent_total|"
    "windows_os_.*|windows_system_.*"
)
# The Octopus blog's node list (README's example), the service drop, and a label added to everything.
RULE_SETS: dict[str, list[dict[str, Any]]] = {
    "keep-list": [{"source_labels": ["__name__"], "regex": KEEP_LIST_REGEX, "action": "keep"}],
    "drop windows_service_.*": [
        {"source_labels": ["__name__"], "regex": "windows_service_.*", "action": "drop"}
    ],
    "add label node=x": [{"target_label": "node", "replacement": "x"}],
}


@dataclass
class RewriterResult:
    rules: str
    samples: int  # sample lines in the input
    kept: int  # sample lines in the output
    cold_per_s: float
    warm_per_s: float
    cold_passes: int
    warm_passes: int
    cpu: int | None  # the core it was pinned to


def count_samples(body: bytes) -> int:
    return sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))


@contextlib.contextmanager
def one_core() -> Iterator[int | None]:
    """Pin this process to one of its cores for the duration; restore the mask after."""
    try:
        before = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        yield None
        return
    core = max(before)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)


def bench_rewriter(payload: bytes, *, cold_passes: int = 3, warm_passes: int = 5) -> list[RewriterResult]:
    from proxy.relabel import parse_rules
    from proxy.rewrite import Rewriter, RuleSet

    chunks = [payload[i : i + CHUNK] for i in range(0, len(payload), CHUNK)]
    samples = count_samples(payload)

    def one_scrape(ruleset: Any) -> tuple[float, bytes]:
        out: list[bytes] = []
        start = time.perf_counter()
        rewriter = Rewriter(ruleset, openmetrics=False)
        for chunk in chunks:
            out.append(rewriter.feed(chunk))
        out.append(rewriter.finish())
        return time.perf_counter() - start, b"".join(out)

    results = []
    with one_core() as core:
        for name, raw in RULE_SETS.items():
            gc.collect()
            cold = []
            for _ in range(cold_passes):  # each pass is the first of a fresh RuleSet
                ruleset = RuleSet(parse_rules(raw), cache_size=10**6)
                elapsed, output = one_scrape(ruleset)
                cold.append(elapsed)
            warm = [one_scrape(ruleset)[0] for _ in range(warm_passes)]
            results.append(
                RewriterResult(
                    rules=name,
                    samples=samples,
                    kept=count_samples(output),
                    cold_per_s=samples / min(cold),
                    warm_per_s=samples / min(warm),
                    cold_passes=cold_passes,
                    warm_passes=warm_passes,
                    cpu=core,
                )
            )
    return results
