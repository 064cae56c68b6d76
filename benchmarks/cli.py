"""`python -m benchmarks`: one run of every scenario, then RESULTS.md, the chart and the tables."""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from benchmarks import peers
from benchmarks.procs import ServerError, Supervisor
from benchmarks.report import (
    Results,
    X,
    draw_chart,
    load_average,
    preserved_optimisations,
    proxy_fingerprint,
    proxy_state,
    render,
    stdout_report,
)
from benchmarks.rewriter import bench_rewriter, count_samples
from benchmarks.run import (
    REPO,
    RULE_FLAGS,
    Bench,
    Row,
    Settings,
    coalesce_specs,
    snapshot_proxy,
    static_specs,
)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "RESULTS.md"
CHART_NAME = "results.png"
DEFAULT_SCALES = (1, 10, 100)
DEFAULT_DURATION = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the proxy beside nginx and exporter_exporter on 127.0.0.1 (issue 5).",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run for CI: {X}1 only, 1 s per measurement, no chart unless --chart; "
        "writes only where --out says",
    )
    parser.add_argument(
        "--scales",
        type=_scales,
        default=None,
        help=f"payload scales, comma-separated (default {','.join(map(str, DEFAULT_SCALES))}; smoke: 1)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_int,
        default=None,
        help=f"seconds per wrk run (whole seconds; default {DEFAULT_DURATION}, smoke: 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"where to write the results (default {DEFAULT_OUT.relative_to(HERE.parent)}; "
        "smoke: nothing unless given); the chart goes next to it",
    )
    parser.add_argument(
        "--chart",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"draw {CHART_NAME} next to --out with matplotlib (default: on, off in smoke)",
    )
    parser.add_argument(
        "--install",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as root, apt-get install missing peers (nginx-light, wrk, prometheus-exporter-exporter)",
    )
    parser.add_argument(
        "--rows",
        default="",
        help="only rows whose name contains one of these comma-separated words (the others are "
        "listed as not selected); e.g. nginx,passthrough",
    )
    parser.add_argument(
        "--proxy-rev",
        metavar="REV",
        help="measure proxy/ as committed at this git revision (unpacked from git into the run's "
        "temporary directory) instead of the working tree: a baseline, or a run the editor of "
        "proxy/ cannot disturb",
    )
    parser.add_argument(
        "--no-coalesce-scenario", dest="coalesce", action="store_false", help="skip the coalescing scenario"
    )
    parser.add_argument(
        "--no-rewriter", dest="rewriter", action="store_false", help="skip the rewriter alone"
    )
    args = parser.parse_args(argv)
    if args.scales is None:
        args.scales = [1] if args.smoke else list(DEFAULT_SCALES)
    if args.duration is None:
        args.duration = 1 if args.smoke else DEFAULT_DURATION
    if args.chart is None:
        args.chart = not args.smoke
    if args.out is None and not args.smoke:
        args.out = DEFAULT_OUT
    if args.chart and args.out is None:
        parser.error("--chart needs --out (the chart is written next to it)")
    return args


def _scales(text: str) -> list[int]:
    try:
        scales = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated whole numbers, e.g. 1,10,100") from None
    if not scales or scales[0] < 1:
        raise argparse.ArgumentTypeError("scales are whole numbers >= 1")
    return scales


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number of seconds (wrk takes no fractions)") from None
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def payload(scale: int) -> bytes:
    from proxy.fake_exporter import FakeExporter

    return FakeExporter(scale=scale).variant(None, openmetrics=False, compress=False).body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # ^C and SIGTERM both unwind through the finally blocks that stop every server. SIGINT is set
    # explicitly: a shell that starts us in the background would have it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    started, t0, load_before = datetime.now(UTC), time.monotonic(), load_average()
    settings = Settings(
        duration_s=args.duration,
        warmup_s=0.2 if args.smoke else 1.0,
        warmup_max=3 if args.smoke else 50,
        settle_s=0.2 if args.smoke else 0.5,
        rows=tuple(part.strip() for part in args.rows.split(",") if part.strip()),
    )
    tools = peers.find_tools(install=args.install, log=log)
    for key, reason in tools.missing.items():
        log(f"{key}: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="wmp-bench-"))
    rows: list[Row] = []
    sizes: dict[int, int] = {}
    notes: list[str] = []
    rewriter_results = []
    rewriter_skipped: str | None = None
    rewriter_scale = 1 if args.smoke else 10
    proxy_root = REPO
    try:
        if args.proxy_rev:
            proxy_root = workdir / "proxy-src"
            try:
                commit = snapshot_proxy(args.proxy_rev, proxy_root)
            except (ValueError, OSError, subprocess.SubprocessError) as exc:
                log(f"error: {exc}")
                return 2
            if "proxy" in sys.modules:
                raise RuntimeError("proxy was imported before --proxy-rev could take effect")
            sys.path.insert(0, str(proxy_root))  # the rewriter, in-process, measures it too
            proxy_at_start = f"--proxy-rev {args.proxy_rev} (commit {commit}, proxy/ unpacked from git)"
        else:
            proxy_at_start = proxy_state()
        fingerprint = proxy_fingerprint(proxy_root)
        with Supervisor(workdir) as supervisor:
            bench = Bench(supervisor, tools, workdir, settings, log, proxy_root)
            www = workdir / "www"
            bodies: dict[int, bytes] = {}
            for scale in sorted({*args.scales, rewriter_scale}):
                bodies[scale] = payload(scale)
                if scale in args.scales:
                    sizes[scale] = len(bodies[scale])
                    (www / f"x{scale}").mkdir(parents=True)
                    (www / f"x{scale}" / "metrics").write_bytes(bodies[scale])

            # The rewriter first, while nothing else runs.
            rewriter_input = (
                f"the {X}{rewriter_scale} payload ({count_samples(bodies[rewriter_scale]):,} samples)"
            )
            if args.rewriter:
                log(f"rewriter alone, {rewriter_input}")
                try:
                    rewriter_results = bench_rewriter(
                        bodies[rewriter_scale],
                        cold_passes=1 if args.smoke else 3,
                        warm_passes=2 if args.smoke else 5,
                    )
                except Exception as exc:  # the lead may be changing this API: say so, go on
                    rewriter_skipped = f"{type(exc).__name__}: {exc}"
            else:
                rewriter_skipped = "skipped (--no-rewriter)"
            bodies.clear()

            upstream = None
            try:
                upstream = bench.start_static_upstream(www)
            except ServerError as exc:
                notes.append(f"the static upstream did not start: {exc}")
            specs = static_specs(bench.rules_file)
            for scale in args.scales:
                scenario = f"x{scale}"
                log(f"payload {X}{scale} ({sizes[scale]:,} bytes)")
                for spec in specs:
                    if upstream is None or upstream.port is None:
                        rows.append(Row(scenario, spec, skipped="not measured: no upstream (nginx missing)"))
                        continue
                    rows.append(bench.measure(scenario, spec, upstream.port, f"/x{scale}/metrics"))
            if upstream is not None:
                supervisor.stop(upstream)

            if args.coalesce:
                log("coalescing: fake exporter, one scrape at a time, 50 ms each")
                fake = bench.start_fake_exporter()
                assert fake.port is not None
                for spec in coalesce_specs():
                    rows.append(bench.measure("coalesce", spec, fake.port, "/metrics"))
                supervisor.stop(fake)
        # Read while a --proxy-rev snapshot still exists (the temporary directory goes next).
        source_changed = proxy_fingerprint(proxy_root) != fingerprint
    except KeyboardInterrupt:
        log("interrupted: every server stopped")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    notes += _odd_things(rows, sizes)
    if source_changed:
        notes.insert(
            0,
            f"**the proxy's source (proxy/) changed during this run** (it began at {proxy_at_start}, "
            f"now {proxy_state()}): its rows may have measured different code; run again",
        )
    results = Results(
        started=started,
        elapsed_s=0.0,
        argv=["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])],
        smoke=args.smoke,
        settings=settings,
        scales=args.scales,
        payload_bytes=sizes,
        rows=rows,
        rewriter=rewriter_results,
        rewriter_input=rewriter_input,
        rewriter_skipped=rewriter_skipped,
        tools=tools,
        notes=notes,
        load_before=load_before,
        proxy_at_start=proxy_at_start,
    )
    chart_rel = None
    if args.chart and args.out is not None:
        chart = args.out.parent / CHART_NAME
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            draw_chart(results, chart)
            chart_rel = CHART_NAME
        except ImportError as exc:
            results.chart_skipped = f"matplotlib is missing ({exc}); pip install -e '.[bench]'"
        except Exception as exc:  # a chart must not cost the measurements
            results.chart_skipped = f"{type(exc).__name__}: {exc}"
    results.elapsed_s = time.monotonic() - t0
    print(stdout_report(results))
    if args.out is not None:
        optimisations = preserved_optimisations(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results, optimisations, chart_rel=chart_rel))
        log(f"wrote {args.out}" + (f" and {args.out.parent / CHART_NAME}" if chart_rel else ""))
    log(f"total {results.elapsed_s:.0f} s")
    return 0


def _odd_things(rows: list[Row], sizes: dict[int, int]) -> list[str]:
    """What a reader should not miss: failures, errors, bodies that are not what was served."""
    notes = []
    for row in rows:
        where = f"{row.name} ({scale_label(row.scenario)})"
        if row.skipped and "not selected" not in row.skipped:
            notes.append(f"{where}: {row.skipped}")
        notes += [f"{where}: {note}" for note in row.notes]
        runs = [(label, r) for label, r in (("1 scraper", row.seq), ("8 scrapers", row.conc)) if r]
        errors = [
            ", ".join(f"{kind} {count:,}" for kind, count in r.error_kinds.items()) + f" ({label})"
            for label, r in runs
            if r.socket_errors
        ]
        if errors:
            notes.append(f"{where}: wrk's socket errors: {'; '.join(errors)}")
        if row.scenario != "coalesce":
            non2xx = [f"{r.non2xx:,} ({label})" for label, r in runs if r.non2xx]
            if non2xx:
                notes.append(f"{where}: non-2xx answers: {', '.join(non2xx)}")
        empty = [label for label, r in runs if r.ok == 0]
        if empty:
            notes.append(f"{where}: no 2xx scrape completed within the run: {', '.join(empty)}")
        # Rows that pass bytes through must deliver the upstream's body, byte for byte in size.
        rules = any(flag in row.spec.proxy_args for flag in RULE_FLAGS)
        reencodes = row.spec.kind == "exporter_exporter" and row.spec.verify
        passes_through = not rules and not reencodes
        if (
            row.body is not None
            and row.body.status == 200
            and row.scenario.startswith("x")
            and passes_through
        ):
            expected = sizes.get(int(row.scenario[1:]))
            if expected is not None and row.body.body_bytes != expected:
                notes.append(f"{where}: body of {row.body.body_bytes:,} bytes, expected {expected:,}")
    return notes


def scale_label(scenario: str) -> str:
    return f"{X}{scenario[1:]}" if scenario.startswith("x") else scenario
