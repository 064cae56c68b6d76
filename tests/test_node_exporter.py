"""The proxy in front of a real Go exporter: Debian's prometheus-node-exporter on 127.0.0.1.

Why this exists: every other test talks to the fake windows_exporter, which is Python (aiohttp) and
so cannot show that the proxy copes with what a real Go exporter actually does on the wire.
windows_exporter does not run on Linux, but node_exporter is its sibling with the same HTTP stack:

- the same client_golang `promhttp` handler: chunked transfer encoding in net/http's 2048-byte
  chunks, gzip when the scraper asks for it, and a bounded number of scrapes in flight, past which a
  scrape gets 503 "Limit of concurrent requests reached (N), try again later.";
- the same exporter-toolkit `--web.config.file`: TLS (`tls_server_config`) and basic auth with bcrypt
  hashes (`basic_auth_users`);
- the same `collect[]` query filtering.

How it differs from windows_exporter, so nothing here is mistaken for a windows_exporter fact:

- It is a Linux program reading /proc and /sys; its metrics are `node_*` (plus `go_*`, `process_*`,
  `promhttp_*`), not `windows_*`, and its collector names differ (`meminfo`, not `memory`).
- Its in-flight limit is a flag, `--web.max-requests`, default 40, so out of the box it serves
  concurrent scrapes. windows_exporter's was `--telemetry.max-requests`, default 5, until the flag
  was removed and the limit hard-coded to 1 (windows_exporter PR #2030, released in v0.31.0; this
  repo's docs say "0.30 and later"). Here `--web.max-requests=1` stands in for that.
- node_exporter 1.5.0 does not enable OpenMetrics: it answers Prometheus's OpenMetrics `Accept` with
  text 0.0.4. It ignores `X-Prometheus-Scrape-Timeout-Seconds`, which windows_exporter uses to size
  its collector timeout. It listens on 9100 by default (windows_exporter on 9182).

Every process listens on 127.0.0.1 only, is waited for by polling its port, and is always stopped.
Never start the package's system service (it would listen on *:9100).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LOOPBACK, ProxyFactory, require_binary
from tests.test_app import PROMETHEUS_ACCEPT, raw_get, sample_value
from tests.test_e2e_prometheus import SYNTHETIC, Prometheus, free_port, label_sets, running_prometheus
from tests.test_security import CA, basic

NODE_EXPORTER_INSTALL = "Debian's prometheus-node-exporter package; `make test` installs it as root"

# The collectors. Chosen for three properties, measured on a 2-CPU Debian container:
# - fast: a scrape takes about 5 ms, so 300 through the proxy and 300 direct, all parsed, take ~12 s;
# - a stable series SET between scrapes (values change, names and labels do not): vmstat and netstat
#   with every field (`.*`) expose the kernel's fixed /proc/vmstat and /proc/net/{netstat,snmp,snmp6}
#   counters, meminfo, stat and loadavg are fixed sets too, and cpu gives 10 series per CPU. Nothing
#   here has per-process, per-mount, per-interface or per-slab series that come and go, none needs
#   root (slabinfo would), and only cpu grows with the CPU count;
# - big: about 110 KB and 740 samples, so about 55 chunks of 2048 bytes (the test measures and
#   asserts at least 30 KB and 15 chunks). The go_*/process_*/promhttp_* exporter metrics stay in:
#   their set is fixed too (promhttp pre-creates its code="200|500|503" counters).
COLLECTORS = (
    "--collector.disable-defaults",
    "--collector.cpu",
    "--collector.meminfo",
    "--collector.stat",
    "--collector.loadavg",
    "--collector.vmstat",
    "--collector.vmstat.fields=.*",
    "--collector.netstat",
    "--collector.netstat.fields=.*",
)
ENABLED = {flag.removeprefix("--collector.") for flag in COLLECTORS if "=" not in flag} - {"disable-defaults"}
MIN_BODY_BYTES = 30_000
MIN_CHUNKS = 15
GO_CHUNK = 2048  # net/http's chunkWriter flushes its 2048-byte bufio buffer as one chunk

SEQUENTIAL_SCRAPES = 300
SEQUENTIAL_BUDGET = 45.0  # seconds; the loop took about 12 s on the shared 2-CPU machine
COALESCED_SCRAPERS = 6
COALESCE_ROUNDS = 10  # rounds until one is fully coalesced (all arrive before the flight ends)
DIRECT_PAIR_ATTEMPTS = 200  # tries until two direct scrapes overlap and one is refused
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)

RULES = """\
metric_relabel_configs:
  - source_labels: [__name__]
    regex: node_cpu.*
    action: keep
  - target_label: node
    replacement: linux-sibling
"""
KEPT = re.compile(r"node_cpu.*")
ADDED_LABEL = ("node", "linux-sibling")

Series = tuple[str, frozenset[tuple[str, str]]]


# --- node_exporter processes -----------------------------------------------------------------------


@dataclass
class NodeExporter:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def wait_listening(self, within: float = 10.0) -> bool:
        """Poll the port until it accepts; False if the process exited first (e.g. port taken)."""
        deadline = time.monotonic() + within
        for _ in range(400):
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    pass
            except OSError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.025)
                continue
            return self.process.poll() is None
        pytest.fail(
            f"node_exporter did not listen on {LOOPBACK}:{self.port} within {within:g}s:\n{self.tail()}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@contextmanager
def running_node_exporter(workdir: Path, *flags: str, scheme: str = "http") -> Iterator[NodeExporter]:
    """A node_exporter on a free 127.0.0.1 port, listening; stopped (and its log printed) on exit."""
    binary = require_binary("prometheus-node-exporter", NODE_EXPORTER_INSTALL)
    workdir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):  # the free port can be taken between probing it and node_exporter binding it
        port = free_port()
        log_path = workdir / f"node_exporter-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [binary, f"--web.listen-address={LOOPBACK}:{port}", *flags],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        exporter = NodeExporter(port, process, log_path, scheme)
        try:
            if exporter.wait_listening():
                yield exporter
                return
        finally:
            exporter.stop()
            print(
                f"--- node_exporter (exit {process.returncode}) log tail, {log_path} ---\n{exporter.tail()}"
            )
        if "address already in use" not in exporter.tail():
            pytest.fail(f"node_exporter exited ({process.returncode}) before listening:\n{exporter.tail()}")
    pytest.fail("node_exporter found no free port in 3 attempts")


@pytest.fixture(scope="module")
def node_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeExporter]:
    """One scrape at a time, as windows_exporter serves."""
    workdir = tmp_path_factory.mktemp("node_exporter")
    with running_node_exporter(workdir, "--web.max-requests=1", *COLLECTORS) as exporter:
        yield exporter


# --- scraping and comparing ------------------------------------------------------------------------


def series_set(text: str) -> set[Series]:
    """Every sample's name and labels, by prometheus_client's parser; a repeated series is an error."""
    samples = [
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]
    unique = set(samples)
    assert len(unique) == len(samples), f"{len(samples) - len(unique)} series appear twice"
    return unique


def describe_difference(got: set[Series], expected: set[Series]) -> str:
    def show(items: set[Series]) -> list[str]:
        return [f"{name}{dict(sorted(labels))}" for name, labels in sorted(items, key=str)[:5]]

    missing, extra = expected - got, got - expected
    return f"missing {len(missing)}: {show(missing)}; extra {len(extra)}: {show(extra)}"


def direct_session(**kwargs: Any) -> aiohttp.ClientSession:
    """A client for the exporter itself: no proxy from the environment, no automatic gzip."""
    return aiohttp.ClientSession(
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
        timeout=REQUEST_TIMEOUT,
        **kwargs,
    )


async def fetch(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


async def direct_series(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> set[Series]:
    status, _, body = await fetch(session, url, **kwargs)
    assert status == 200, (status, body[:200])
    return series_set(body.decode())


async def assert_same_as_direct(
    got: set[Series], before: set[Series], session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> None:
    """`got` equals a direct scrape's set taken right before it, or (if not) one taken right after."""
    if got == before:
        return
    after = await direct_series(session, url, **kwargs)
    assert got == after, describe_difference(got, after)


async def chunk_sizes(port: int, path: str = "/metrics") -> list[int]:
    """The chunk sizes of one raw HTTP/1.1 response, read off the socket (nothing decodes them)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"\r\ntransfer-encoding: chunked" in head.lower(), head
    sizes: list[int] = []
    for _ in range(100_000):
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        sizes.append(size)
        if size == 0:
            return sizes
        assert rest[size : size + 2] == b"\r\n", "chunk not followed by CRLF"
        rest = rest[size + 2 :]
    raise AssertionError("no last chunk")


async def proxy_get(
    proxy: TestClient, path: str = "/metrics", **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    async with proxy.get(path, timeout=REQUEST_TIMEOUT, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


# --- 1: hundreds of sequential scrapes, each complete -------------------------------------------------


async def test_sequential_scrapes_are_each_a_complete_exposition(
    node_exporter: NodeExporter, make_proxy: ProxyFactory
) -> None:
    # The premise: a real Go body of many 2048-byte chunks.
    sizes = await chunk_sizes(node_exporter.port)
    body_bytes = sum(sizes)
    assert body_bytes >= MIN_BODY_BYTES, f"only {body_bytes} bytes: pick bigger collectors"
    assert len(sizes) >= MIN_CHUNKS, sizes
    assert sizes.count(GO_CHUNK) >= MIN_CHUNKS - 2, f"expected mostly {GO_CHUNK}-byte chunks: {sizes}"
    print(
        f"direct body: {body_bytes} bytes in {len(sizes) - 1} chunks, {sizes.count(GO_CHUNK)} of {GO_CHUNK}"
    )

    proxy = await make_proxy(port=node_exporter.port)
    url = f"{node_exporter.url}/metrics"
    started = time.monotonic()
    async with direct_session() as session:
        for scrape in range(SEQUENTIAL_SCRAPES):
            assert time.monotonic() - started < SEQUENTIAL_BUDGET, f"only {scrape} scrapes in the time budget"
            before = await direct_series(session, url)
            status, headers, body = await proxy_get(proxy)
            assert status == 200, (scrape, status, body[:200])
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
            got = series_set(body.decode())
            assert len(got) > 500, (scrape, len(got))
            await assert_same_as_direct(got, before, session, url)
    print(f"{SEQUENTIAL_SCRAPES} sequential scrapes in {time.monotonic() - started:.1f}s")


# --- 1b: the same exporter over a network that segments its stream ----------------------------------

PACED_SCRAPES = 100
PACED_BUDGET = 60.0  # seconds; the loop took 3 to 4 s
SEGMENT_BYTES = (1, 1448)  # a TCP segment's payload over a 1500-byte MTU network, at most
SEGMENT_PAUSE = 0  # seconds between segments: a turn of the loop lets the proxy read each one alone


@contextlib.asynccontextmanager
async def segmenting_relay(upstream_port: int, seed: int) -> AsyncIterator[int]:
    """A TCP relay on 127.0.0.1 that hands the exporter's bytes on in segments of random size.

    On loopback Go's 4 KiB writes reach the proxy whole, so a read almost never ends between a
    chunk's data and its CRLF (a 2055-byte chunk frame and 4096-byte writes line up that way about
    once in 4096 chunks). A real network delivers MTU-sized segments at its own pace; this relay
    does the same, with a seeded generator, so each run cuts the same way.
    """
    cuts = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, paced: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                while data:
                    size = cuts.randint(*SEGMENT_BYTES) if paced else len(data)
                    writer.write(data[:size])
                    data = data[size:]
                    await writer.drain()
                    if paced:
                        await asyncio.sleep(SEGMENT_PAUSE)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def on_connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, upstream_port)
        for task in (
            asyncio.create_task(pipe(client_reader, up_writer, paced=False)),
            asyncio.create_task(pipe(up_reader, client_writer, paced=True)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(on_connect, LOOPBACK, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.parametrize("rewriting", [False, True], ids=["passthrough", "rules"])
async def test_scrapes_over_a_segmenting_network_are_each_complete(
    node_exporter: NodeExporter, make_proxy: ProxyFactory, tmp_path: Path, rewriting: bool
) -> None:
    """Through a relay that cuts the exporter's stream at random points, as a network does."""
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES)
    url = f"{node_exporter.url}/metrics"
    started = time.monotonic()
    async with segmenting_relay(node_exporter.port, seed=9) as relay_port, direct_session() as session:
        extra = {"relabel_config": str(rules)} if rewriting else {}
        proxy = await make_proxy(port=relay_port, **extra)
        for scrape in range(PACED_SCRAPES):
            assert time.monotonic() - started < PACED_BUDGET, f"only {scrape} scrapes in the time budget"
            before = await direct_series(session, url)
            status, _, body = await proxy_get(proxy)
            assert status == 200, (scrape, status, body[:200])
            got = series_set(body.decode())
            if rewriting:
                expected = {(name, labels | {ADDED_LABEL}) for name, labels in before if KEPT.fullmatch(name)}
                assert got == expected, (scrape, describe_difference(got, expected))
            else:
                await assert_same_as_direct(got, before, session, url)
    print(f"{PACED_SCRAPES} paced scrapes in {time.monotonic() - started:.1f}s")


# --- 2: modes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/metrics", "/metrics?collect[]=cpu&collect[]=meminfo"],
    ids=["all", "collect-filter"],
)
async def test_passthrough(node_exporter: NodeExporter, make_proxy: ProxyFactory, path: str) -> None:
    proxy = await make_proxy(port=node_exporter.port)
    headers = {"Accept": PROMETHEUS_ACCEPT}
    async with direct_session() as session:
        d_status, d_headers, d_body = await fetch(session, f"{node_exporter.url}{path}", headers=headers)
        status, p_headers, body = await proxy_get(proxy, path, headers=headers)
        assert d_status == status == 200, (status, body[:200])
        # node_exporter 1.5.0 answers the OpenMetrics Accept with text 0.0.4; the proxy says the same.
        assert p_headers["Content-Type"] == d_headers["Content-Type"]
        got = series_set(body.decode())
        await assert_same_as_direct(got, series_set(d_body.decode()), session, f"{node_exporter.url}{path}")

    collectors = {
        dict(labels)["collector"] for name, labels in got if name == "node_scrape_collector_success"
    }
    if "collect[]" in path:
        # The query string reached the exporter: only the two collectors ran.
        assert collectors == {"cpu", "meminfo"}, collectors
        node_names = {name for name, _ in got if name.startswith("node_")}
        assert all(re.match(r"node_(cpu|memory|scrape|exporter)_", name) for name in node_names), node_names
    else:
        assert collectors == ENABLED, collectors


async def test_rules_match_the_dry_run_and_the_expectation(
    node_exporter: NodeExporter, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    proxy = await make_proxy(port=node_exporter.port, relabel_config=rules)
    url = f"{node_exporter.url}/metrics"

    async def dry_run(capture: bytes) -> set[Series]:
        """What `windows-metrics-proxy relabel` says the proxy serves for that exporter output."""
        path = tmp_path / "capture.prom"
        path.write_bytes(capture)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "relabel",
            "--config",
            str(rules),
            str(path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, err.decode()
        return series_set(out.decode())

    def expected(capture: bytes) -> set[Series]:
        """The same rules applied here, independently: keep node_cpu.*, add one label."""
        return {
            (name, labels | {ADDED_LABEL})
            for name, labels in series_set(capture.decode())
            if KEPT.fullmatch(name)
        }

    async with direct_session() as session:
        status, _, before = await fetch(session, url)
        assert status == 200
        p_status, _, body = await proxy_get(proxy)
        assert p_status == 200, body[:200]
        got = series_set(body.decode())
        want = await dry_run(before)
        assert want == expected(before), describe_difference(want, expected(before))
        if got != want:  # the CPU set could only change if a CPU went on- or offline in between
            status, _, after = await fetch(session, url)
            assert status == 200
            want = await dry_run(after)
        assert got == want, describe_difference(got, want)

    assert got, "the rules kept nothing"
    assert all(KEPT.fullmatch(name) and ADDED_LABEL in labels for name, labels in got)
    text = body.decode()
    assert "# TYPE node_cpu_seconds_total counter" in text
    assert "# TYPE go_" not in text  # the dropped families' HELP and TYPE went with them


async def test_coalesced_scrapers_share_one_scrape_that_direct_ones_collide_on(
    node_exporter: NodeExporter, make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(port=node_exporter.port)

    async def counters() -> tuple[float, float]:
        text = (await proxy_get(proxy, "/proxy/metrics"))[2].decode()
        upstream = sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="success"')
        return upstream, sample_value(text, "windows_metrics_proxy_coalesced_scrapes_total")

    await proxy_get(proxy)  # one upstream request first, so its counter line exists
    fully_shared = None
    for round_ in range(COALESCE_ROUNDS):
        upstream_0, coalesced_0 = await counters()
        results = await asyncio.gather(*(proxy_get(proxy) for _ in range(COALESCED_SCRAPERS)))
        upstream_1, coalesced_1 = await counters()
        # Every round, however the arrivals fell: nobody got the exporter's 503, each body is whole,
        # and each scrape either made the upstream request or shared one.
        assert [status for status, _, _ in results] == [200] * COALESCED_SCRAPERS, [
            r[2][:100] for r in results
        ]
        bodies = {body for _, _, body in results}
        for body in bodies:
            assert len(series_set(body.decode())) > 500
        upstream, coalesced = upstream_1 - upstream_0, coalesced_1 - coalesced_0
        assert upstream + coalesced == COALESCED_SCRAPERS, (upstream, coalesced)
        assert len(bodies) <= upstream, (len(bodies), upstream)
        if upstream == 1:
            fully_shared = round_
            break
    assert fully_shared is not None, f"no round of {COALESCE_ROUNDS} had all scrapers share one request"
    assert len(bodies) == 1  # identical bodies, byte for byte
    print(f"all {COALESCED_SCRAPERS} scrapers shared one upstream request in round {fully_shared + 1}")

    # The same exporter, scraped directly by a concurrent pair: one of them is refused.
    async with direct_session() as session:
        url = f"{node_exporter.url}/metrics"
        refused = None
        attempts = 0
        while refused is None and attempts < DIRECT_PAIR_ATTEMPTS:
            attempts += 1
            pair = await asyncio.gather(fetch(session, url), fetch(session, url))
            statuses = sorted(status for status, _, _ in pair)
            assert statuses in ([200, 200], [200, 503]), statuses
            if statuses == [200, 503]:
                refused = next(result for result in pair if result[0] == 503)
    assert refused is not None, f"{DIRECT_PAIR_ATTEMPTS} concurrent direct pairs never overlapped"
    _, headers, body = refused
    print(f"direct 503 after {attempts} pairs: {headers} {body!r}")
    assert b"concurrent requests" in body  # promhttp's own explanation, as text/plain
    assert headers["Content-Type"].startswith("text/plain")


async def test_gzip_passes_through(node_exporter: NodeExporter, make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(port=node_exporter.port)
    headers = {"Accept-Encoding": "gzip"}
    async with direct_session() as session:
        d_status, d_headers, d_body = await fetch(session, f"{node_exporter.url}/metrics", headers=headers)
        status, p_headers, body = await raw_get(proxy.server.port, "/metrics", headers)
        assert d_status == status == 200
        assert d_headers["Content-Encoding"] == p_headers["Content-Encoding"] == "gzip"
        assert body[:2] == b"\x1f\x8b", body[:20]
        text = gzip.decompress(body).decode()
        assert len(body) < len(text) / 3  # it really is the compressed body
        got = series_set(text)
        before = series_set(gzip.decompress(d_body).decode())
        await assert_same_as_direct(got, before, session, f"{node_exporter.url}/metrics")


async def test_https_upstream_with_basic_auth(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    ca = CA(tmp_path, "node-exporter-ca")
    server = ca.issue("node-exporter", server=True)
    password = "correct horse battery staple"
    # Cost 6 keeps node_exporter's bcrypt check quick; exporter-toolkit accepts any cost.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()
    web_config = tmp_path / "web.yml"
    web_config.write_text(
        f"tls_server_config:\n  cert_file: {server.cert}\n  key_file: {server.key}\n"
        f"basic_auth_users:\n  scraper: '{hashed}'\n"
    )
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text(password + "\n")
    wrong.write_text("not the password\n")
    tls_settings = {"upstream_scheme": "https", "upstream_ca_file": ca.path, "upstream_username": "scraper"}

    context = ssl.create_default_context(cafile=str(ca.path))
    with running_node_exporter(
        tmp_path / "node_exporter", f"--web.config.file={web_config}", *COLLECTORS, scheme="https"
    ) as exporter:
        url = f"{exporter.url}/metrics"
        auth = {"Authorization": basic("scraper", password)}
        async with direct_session(connector=aiohttp.TCPConnector(ssl=context)) as session:
            # The exporter really requires both: no credentials is 401, plain HTTP is refused.
            status, no_auth_headers, no_auth_body = await fetch(session, url)
            assert status == 401, no_auth_body
            plain_status, _, plain_body = await fetch(session, f"http://{LOOPBACK}:{exporter.port}/metrics")
            assert plain_status == 400, plain_body
            print(f"no credentials: 401 {no_auth_headers} {no_auth_body!r}; plain http: 400 {plain_body!r}")

            proxy = await make_proxy(port=exporter.port, upstream_password_file=right, **tls_settings)
            before = await direct_series(session, url, headers=auth)
            status, _, body = await proxy_get(proxy)
            assert status == 200, body[:300]
            await assert_same_as_direct(series_set(body.decode()), before, session, url, headers=auth)

            # A wrong password: what does the scraper get? Compare with the exporter's own answer.
            d_status, d_headers, d_body = await fetch(
                session, url, headers={"Authorization": basic("scraper", "not the password")}
            )
            denied = await make_proxy(port=exporter.port, upstream_password_file=wrong, **tls_settings)
            status, headers, body = await proxy_get(denied)
            print(
                f"wrong password: direct {d_status} {d_headers} {d_body!r}; proxy {status} {headers} {body!r}"
            )
            assert d_status == 401
            assert status == d_status, body  # passed through, not mapped to 502
            assert body == d_body
            text = (await proxy_get(denied, "/proxy/metrics"))[2].decode()
            assert (
                sample_value(text, "windows_metrics_proxy_upstream_requests_total", 'outcome="http_error"')
                == 1
            )
            # The exporter's challenge is an end-to-end header, so it comes through too: a browser
            # pointed at the proxy (which asked for no credentials itself) would offer a login.
            assert headers.get("WWW-Authenticate") == d_headers.get("WWW-Authenticate") == "Basic", headers


# --- 3: a real Prometheus scrapes it directly and through the proxy ------------------------------------

PROMETHEUS_YML = """\
global:
  scrape_interval: 1s
  scrape_timeout: 800ms
  evaluation_interval: 1m
scrape_configs:
  - job_name: node_direct
    static_configs:
      - targets: ["{loopback}:{exporter_port}"]
  - job_name: node_proxy
    static_configs:
      - targets: ["{loopback}:{proxy_port}"]
"""


@pytest.mark.e2e
async def test_prometheus_ingests_the_same_series_directly_and_through_the_proxy(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    # node_exporter's default --web.max-requests (40), not 1: Prometheus schedules the two jobs
    # independently, so with 1 their scrapes would now and then collide at the exporter, and those
    # 503s would be the exporter refusing Prometheus's direct job, not anything the proxy did.
    with running_node_exporter(tmp_path / "node_exporter", *COLLECTORS) as exporter:
        proxy = await make_proxy(port=exporter.port)
        config = PROMETHEUS_YML.format(
            loopback=LOOPBACK, exporter_port=exporter.port, proxy_port=proxy.server.port
        )
        async with running_prometheus(tmp_path, config) as prometheus:
            await prometheus.wait_up("node_direct", 1, within=15)
            await prometheus.wait_up("node_proxy", 1, within=15)
            await check_same_ingested_series(prometheus)


async def check_same_ingested_series(prometheus: Prometheus) -> None:
    at = time.time()
    counts = {
        item["metric"]["job"]: float(item["value"][1])
        for item in await prometheus.query('count by (job) ({job=~"node_direct|node_proxy"})', at)
    }
    scraped = {
        item["metric"]["job"]: float(item["value"][1])
        for item in await prometheus.query('scrape_samples_scraped{job=~"node_direct|node_proxy"}', at)
    }
    assert counts.keys() == scraped.keys() == {"node_direct", "node_proxy"}, (counts, scraped)
    assert counts["node_direct"] == counts["node_proxy"], counts
    assert scraped["node_direct"] == scraped["node_proxy"] > 500, scraped
    assert counts["node_direct"] == scraped["node_direct"] + len(SYNTHETIC), (counts, scraped)

    direct = label_sets(await prometheus.series('{job="node_direct"}', at - 60, at))
    via_proxy = label_sets(await prometheus.series('{job="node_proxy"}', at - 60, at))
    assert via_proxy == direct
    assert len(direct) == scraped["node_direct"]
