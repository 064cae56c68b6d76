"""collect[] push-down, measured: the README keep-list through two proxies, push-down on and off.

    .venv/bin/python -m benchmarks.pushdown                  # both payloads, 40 scrapes per mode
    .venv/bin/python -m benchmarks.pushdown --scrapes 10 --profiles 0.31

The fake exporter runs with its collector cost MODEL on (--collector-cost: each answer waits the
longest `windows_exporter_collector_duration_seconds` among the collectors it ran, and adds up
their durations; see proxy/fake_exporter.py). Both proxies are `python -m proxy` subprocesses in
front of the same fake, scraped one after the other by a plain sequential client: per scrape, the
modelled collector seconds the exporter spent and the bytes it sent (the fake's own counters,
/fake/metrics), the scrape's wall time, and the proxy's CPU (utime + stime from /proc). The first
scrape of the push-down proxy learns in full; it is not measured, nor is the other proxy's first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import fetch
from benchmarks.procs import Supervisor, cpu_seconds, free_port
from benchmarks.run import REPO, proxy_env, write_keep_rules
from proxy.fake_exporter import PROFILES


@dataclass
class ModeResult:
    profile: str
    mode: str  # "full" or "push-down"
    scrapes: int
    collectors_run: float  # per scrape
    modelled_s: float  # modelled collector seconds per scrape (sum over the collectors run)
    exporter_bytes: float  # per scrape
    wall_ms: float  # per scrape, client side
    proxy_cpu_ms: float  # per scrape
    served_bytes: int  # the body the scraper got (the same in both modes)


def _fake_counters(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/fake/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {"runs": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("windows_fake_collector_runs_total"):
            out["runs"] += float(value)
        else:
            out[name] = float(value)
    return out


def measure(profile: str, scrapes: int, python: str, workdir: Path) -> list[ModeResult]:
    rules = write_keep_rules(workdir / "keep-list.yaml")
    results: list[ModeResult] = []
    with Supervisor(workdir) as sup:
        fake_port = free_port()
        fake = sup.start(
            f"fake-{profile}",
            [
                python,
                "-m",
                "proxy",
                "fake-exporter",
                "--listen-port",
                str(fake_port),
                "--profile",
                profile,
                "--collector-cost",
                "--max-concurrent",
                "0",
            ],
            env=proxy_env(REPO),
            port=fake_port,
        )
        sup.wait_listening(fake)
        for mode, pushdown in (("full", "false"), ("push-down", "true")):
            port = free_port()
            env = {
                **proxy_env(REPO),
                "PROXY_HOSTIP": "127.0.0.1",
                "PROXY_PORT": str(fake_port),
                "PROXY_LISTEN_ADDRESS": "127.0.0.1",
                "PROXY_LISTEN_PORT": str(port),
                "PROXY_RELABEL_CONFIG": str(rules),
                "PROXY_COLLECTOR_PUSHDOWN": pushdown,
                "PROXY_LOG_LEVEL": "warning",
            }
            proxy = sup.start(f"proxy-{profile}-{mode}", [python, "-m", "proxy"], env=env, port=port)
            sup.wait_listening(proxy)
            first = fetch(port, "/metrics", {})  # push-down: the learning scrape
            assert first.status == 200, first.error_text
            before = _fake_counters(fake_port)
            cpu_before = cpu_seconds(proxy.pids())
            started = time.perf_counter()
            served = 0
            for _ in range(scrapes):
                got = fetch(port, "/metrics", {})
                assert got.status == 200, got.error_text
                served = got.body_bytes
            wall = time.perf_counter() - started
            cpu = cpu_seconds(proxy.pids()) - cpu_before
            after = _fake_counters(fake_port)
            results.append(
                ModeResult(
                    profile=profile,
                    mode=mode,
                    scrapes=scrapes,
                    collectors_run=(after["runs"] - before["runs"]) / scrapes,
                    modelled_s=(
                        after["windows_fake_modelled_collector_seconds_total"]
                        - before["windows_fake_modelled_collector_seconds_total"]
                    )
                    / scrapes,
                    exporter_bytes=(
                        after["windows_fake_sent_bytes_total"] - before["windows_fake_sent_bytes_total"]
                    )
                    / scrapes,
                    wall_ms=wall * 1000 / scrapes,
                    proxy_cpu_ms=cpu * 1000 / scrapes,
                    served_bytes=served,
                )
            )
            sup.stop(proxy)
    return results


def table(results: list[ModeResult]) -> str:
    lines = [
        "| payload | mode | collectors run | modelled exporter s/scrape | exporter bytes/scrape "
        "| scrape wall ms | proxy CPU ms/scrape | served bytes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.profile} | {r.mode} | {r.collectors_run:.0f} | {r.modelled_s:.3f} "
            f"| {r.exporter_bytes:,.0f} | {r.wall_ms:.1f} | {r.proxy_cpu_ms:.2f} | {r.served_bytes:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pushdown", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--scrapes", type=int, default=40, help="measured scrapes per mode (default 40)")
    parser.add_argument(
        "--profiles", default=",".join(PROFILES), help="fake exporter payloads, e.g. 0.20,0.31"
    )
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="interpreter to run")
    args = parser.parse_args(argv)
    results: list[ModeResult] = []
    with tempfile.TemporaryDirectory(prefix="pushdown-bench-") as tmp:
        for profile in args.profiles.split(","):
            results += measure(profile.strip(), args.scrapes, args.python, Path(tmp))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
