"""Self-test of a built image: does the proxy really work on this Python, this OS, as this user?

Dockerfile.windows runs it in the final nanoserver stage, as ContainerUser, so a build only succeeds
if the image works. It also runs anywhere else (the test suite runs it on Linux):

1. reports the interpreter and, for each library with a compiled extension, whether that extension is
   what the proxy actually runs with. aiohttp, multidict, yarl, propcache and frozenlist fall back to
   pure Python when their extension does not load; that fallback is accepted only if asked for, with
   AIOHTTP_NO_EXTENSIONS=1 (any of them) or the library's own *_NO_EXTENSIONS variable, because an
   extension that should load and does not is something to know at build time. pydantic-core and
   google-re2 have no fallback, so they must load;
2. on Windows, checks the console control API the proxy's graceful stop relies on;
3. starts the fake windows_exporter and the proxy (`python -m proxy`, the image's entrypoint) on
   loopback ports and scrapes /health, /metrics, /ready and /proxy/metrics through the proxy, with
   a relabel rule (PROXY_RELABEL_CONFIG) that keeps one metric, so RE2 and the rewriter run too;
   /proxy/metrics must carry process_* series, which on Windows come from the Win32 calls in
   proxy/winprocess.py (the only place those calls run for real before a pod does).

Exit status 0 means all of it worked; anything else prints what did not.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds: a cold start on a small Windows node is slow


def _aiohttp() -> bool:
    from aiohttp import http_parser

    return http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


def _multidict() -> bool:
    import multidict

    return multidict.MultiDict.__module__ == "multidict._multidict"


def _yarl() -> bool:
    from yarl import _quoting

    return _quoting._Quoter.__module__ == "yarl._quoting_c"


def _propcache() -> bool:
    from propcache import _helpers

    return _helpers.under_cached_property.__module__ == "propcache._helpers_c"


def _frozenlist() -> bool:
    import frozenlist

    return frozenlist.FrozenList.__module__ == "frozenlist._frozenlist"


# library -> (is its compiled extension in use?, the variable that asks for pure Python)
OPTIONAL_EXTENSIONS: dict[str, tuple[Callable[[], bool], str]] = {
    "aiohttp": (_aiohttp, "AIOHTTP_NO_EXTENSIONS"),
    "multidict": (_multidict, "MULTIDICT_NO_EXTENSIONS"),
    "yarl": (_yarl, "YARL_NO_EXTENSIONS"),
    "propcache": (_propcache, "PROPCACHE_NO_EXTENSIONS"),
    "frozenlist": (_frozenlist, "FROZENLIST_NO_EXTENSIONS"),
}


# library -> its compiled module, which has no pure-Python fallback
REQUIRED_EXTENSIONS = {"pydantic-core": "pydantic_core._pydantic_core", "google-re2": "re2._re2"}

# The relabel rule the end-to-end check runs with: keep one metric family, drop the rest.
RELABEL_CONFIG = """metric_relabel_configs:
  - source_labels: [__name__]
    regex: windows_cpu_time_total
    action: keep
"""


def check_extensions(problems: list[str]) -> None:
    pure_ok_everywhere = bool(os.environ.get("AIOHTTP_NO_EXTENSIONS"))
    for library, (in_use, variable) in OPTIONAL_EXTENSIONS.items():
        try:
            compiled = in_use()
        except Exception as exc:  # an import error here is a broken install, not a fallback
            problems.append(f"{library}: cannot import: {exc!r}")
            continue
        if compiled:
            print(f"  {library}: compiled extension")
        elif pure_ok_everywhere or os.environ.get(variable):
            print(f"  {library}: pure Python (asked for)")
        else:
            print(f"  {library}: pure Python")
            problems.append(
                f"{library}'s compiled extension did not load; set AIOHTTP_NO_EXTENSIONS=1 "
                f"(or {variable}=1) to accept pure Python"
            )
    for library, module in REQUIRED_EXTENSIONS.items():
        try:
            importlib.import_module(module)
            print(f"  {library}: compiled extension (required, no fallback)")
        except Exception as exc:
            problems.append(f"{library}'s extension {module} did not load, and it has no fallback: {exc!r}")


def check_windows_console_api(problems: list[str]) -> None:
    if sys.platform != "win32":
        return
    try:
        import ctypes

        handler = ctypes.WinDLL("kernel32", use_last_error=True).SetConsoleCtrlHandler
        print(f"  SetConsoleCtrlHandler: {handler!r}")
    except Exception as exc:
        problems.append(f"SetConsoleCtrlHandler is not available: {exc!r}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-m", "proxy", *args], env=env)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode} before answering {url}")
        try:
            get(url, timeout=2.0)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answered {url} within {START_TIMEOUT:.0f} s") from None
            time.sleep(0.2)


def check_end_to_end(problems: list[str]) -> None:
    exporter_port, proxy_port = free_port(), free_port()
    exporter = ["fake-exporter", "--listen-address", LOOPBACK, "--listen-port", str(exporter_port)]
    proxy = [
        "--hostip", LOOPBACK, "--port", str(exporter_port),
        "--listen-address", LOOPBACK, "--listen-port", str(proxy_port),
    ]  # fmt: skip
    base = f"http://{LOOPBACK}:{proxy_port}"
    with tempfile.TemporaryDirectory() as tmp:
        relabel = os.path.join(tmp, "relabel.yaml")
        with open(relabel, "w", encoding="utf-8") as handle:
            handle.write(RELABEL_CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
        env["PROXY_RELABEL_CONFIG"] = relabel
        with running(exporter) as fake, running(proxy, env) as served:
            wait_until_up(f"http://{LOOPBACK}:{exporter_port}/health", fake)
            wait_until_up(f"{base}/health", served)
            # path, status, what the body must contain, what it must not (the relabel rule drops it)
            expectations = [
                ("/health", 200, b"ok", None),
                ("/metrics", 200, b"windows_cpu_time_total{", b"windows_os_info"),
                ("/ready", 200, b"", None),
                ("/proxy/metrics", 200, b"windows_metrics_proxy_build_info", None),
                ("/proxy/metrics", 200, b"\nprocess_cpu_seconds_total ", None),
                ("/proxy/metrics", 200, b"\nprocess_start_time_seconds ", None),
                ("/proxy/metrics", 200, b"\nprocess_resident_memory_bytes ", None),
            ]
            for path, status, needle, absent in expectations:
                got_status, body = get(base + path)
                good = got_status == status and needle in body and (absent is None or absent not in body)
                print(f"  GET {path}: {got_status}, {len(body)} bytes: {'ok' if good else 'FAILED'}")
                if not good:
                    problems.append(
                        f"GET {path} through the proxy gave {got_status} and {len(body)} bytes; wanted "
                        f"{status} with {needle!r}" + (f" and without {absent!r}" if absent else "")
                    )


def main() -> int:
    print(f"Python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
    problems: list[str] = []
    print("Compiled extensions:")
    check_extensions(problems)
    check_windows_console_api(problems)
    print("The proxy in front of the fake exporter, on loopback:")
    try:
        check_end_to_end(problems)
    except Exception as exc:
        problems.append(f"end-to-end check failed: {exc}")
    if problems:
        print("SELFTEST FAILED:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print("selftest passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
