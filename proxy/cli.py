"""Command line: `serve` (the default, the container's job), `fake-exporter` and `demo`.

Settings are read here, once, and handed down. Errors a user can fix come out as one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, get_args

from proxy import __version__
from proxy.logs import configure_logging
from proxy.runtime import StopSignals, console_wait_limit, loop_factory
from proxy.server import start_proxy
from proxy.settings import ConfigError, Settings, env_name, flag_name, load_settings

PROG = "windows-metrics-proxy"
log = logging.getLogger("proxy.cli")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def add_settings_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per setting; values stay strings so pydantic validates flags and env alike."""
    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        help_text = f"{field.description} [env {env_name(name)}, default {field.default!r}]"
        if field.annotation is bool:
            parser.add_argument(
                flag_name(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            choices = get_args(field.annotation) if "Literal" in str(field.annotation) else None
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            parser.add_argument(flag_name(name), dest=name, metavar=metavar, help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    return load_settings(**overrides)


async def serve(settings: Settings, stop: asyncio.Event, *, loop_name: str = "asyncio") -> None:
    proxy = await start_proxy(settings, loop_name=loop_name)
    try:
        await stop.wait()
    finally:
        await proxy.close()
        log.info("stopped")


DEFAULT_SHUTDOWN_TIMEOUT: float = Settings.model_fields["shutdown_timeout"].default


def run(
    main: Callable[[asyncio.Event, str], Coroutine[Any, Any, None]],
    *,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> int:
    """Run a coroutine on the platform's loop until it ends or a stop signal arrives.

    shutdown_timeout is the budget `main` stops within once the stop event is set; on Windows the
    console handler holds the process open that long, plus STOP_ALLOWANCE, and no longer.
    """
    factory, loop_name = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        loop = runner.get_loop()
        stop = asyncio.Event()
        signals = StopSignals(loop, stop, wait_limit=console_wait_limit(shutdown_timeout))
        signals.install()
        try:
            runner.run(main(stop, loop_name))
        except ConfigError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return EXIT_CONFIG
        finally:
            signals.mark_stopped()
            signals.uninstall()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    settings.require_upstream()
    configure_logging(settings.log_level, settings.log_format)
    return run(
        lambda stop, loop_name: serve(settings, stop, loop_name=loop_name),
        shutdown_timeout=settings.shutdown_timeout,
    )


def _cmd_fake_exporter(args: argparse.Namespace) -> int:
    from proxy import fake_exporter

    configure_logging("info", "text")
    return run(lambda stop, _loop_name: fake_exporter.serve_from_args(args, stop))


def _cmd_demo(args: argparse.Namespace) -> int:
    from proxy import demo

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    return run(
        lambda stop, loop_name: demo.run_demo(settings, args, stop, loop_name=loop_name),
        shutdown_timeout=settings.shutdown_timeout,
    )


def _cmd_check_config(args: argparse.Namespace) -> int:
    from proxy.rules import build_rules

    settings = settings_from_args(args)
    settings.require_upstream()
    rules = build_rules(settings)
    print(
        f"configuration OK: upstream {settings.upstream_url}, listen "
        f"{settings.listen_address}:{settings.listen_port}, {len(rules)} relabel rule(s), "
        f"name validation {settings.name_validation}"
    )
    if args.capture is not None:
        print(_pushdown_line(settings, rules, _read_input(args.capture)))
    return 0


def _read_input(source: str) -> bytes:
    try:
        if source == "-":
            return sys.stdin.buffer.read()
        with open(source, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror or exc}") from None


def _pushdown_line(settings: Settings, rules: Sequence[Any], capture: bytes) -> str:
    """Which collectors a scrape would ask the exporter for, given a full scrape's output."""
    if not settings.collector_pushdown:
        return "push-down: off (PROXY_COLLECTOR_PUSHDOWN=false): a scrape asks for every collector"
    if not rules:
        return "push-down: off (no relabel rules): a scrape asks for every collector"
    from proxy.pushdown import Analysis, learn_collectors

    return Analysis(rules).plan(learn_collectors(capture)).describe()


def _cmd_relabel(args: argparse.Namespace) -> int:
    """Apply the rules to an exposition file, as the server would to the same upstream body."""
    from proxy.escaping import Scheme, escape_lines
    from proxy.rewrite import LineTooLong, NamelessSeries, RuleSet, rewrite_bytes
    from proxy.rules import build_rules

    settings = settings_from_args(args)
    rules = build_rules(settings)
    source = args.input
    body = _read_input(source)
    try:
        output = rewrite_bytes(body, RuleSet(rules), openmetrics=args.format == "openmetrics")
        # As a scraper that asked for this scheme gets it (whole lines: escape_lines' input).
        output = escape_lines(output, Scheme(args.escaping))
    except NamelessSeries as exc:
        print(f"{PROG}: error: {exc} (Prometheus fails such a scrape)", file=sys.stderr)
        return EXIT_RUNTIME
    except LineTooLong as exc:
        print(f"{PROG}: error: {source}: {exc} (the proxy fails such a scrape)", file=sys.stderr)
        return EXIT_RUNTIME
    sys.stdout.buffer.write(output)
    sys.stdout.buffer.flush()
    print(_pushdown_line(settings, rules, body), file=sys.stderr)  # stdout stays the body
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command` is the subcommand about to run, so only its own modules load."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Expose a Windows node's windows_exporter to Prometheus from a plain pod.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve_parser = commands.add_parser("serve", help="proxy /metrics to the exporter (the default command)")
    add_settings_flags(serve_parser)
    serve_parser.set_defaults(func=_cmd_serve)

    fake = commands.add_parser(
        "fake-exporter", help="serve a realistic fake windows_exporter for development"
    )
    if command == "fake-exporter":  # its module (and the capture) load only for its own command
        from proxy import fake_exporter

        fake_exporter.add_arguments(fake)
    fake.set_defaults(func=_cmd_fake_exporter)

    demo_parser = commands.add_parser(
        "demo", help="run the fake exporter and the proxy together on free local ports"
    )
    demo_parser.add_argument("--scale", type=int, default=1, help="multiply the fake exporter's series by N")
    if command == "demo":
        from proxy import fake_exporter

        fake_exporter.add_profile_argument(demo_parser)
    add_settings_flags(demo_parser, skip=("hostip", "port", "listen_address"))
    demo_parser.set_defaults(func=_cmd_demo, listen_port="0")

    check = commands.add_parser(
        "check-config", help="validate the settings and relabel rules without serving, then exit"
    )
    add_settings_flags(check)
    check.add_argument(
        "--capture",
        metavar="FILE",
        help="an exporter's full /metrics output: also say which collectors a scrape would ask for",
    )
    check.set_defaults(func=_cmd_check_config)

    relabel = commands.add_parser(
        "relabel",
        help="apply the relabel rules to an exposition file and print the result (a dry run)",
    )
    relabel.add_argument(
        "--config", dest="relabel_config", metavar="FILE", help="YAML file with metric_relabel_configs"
    )
    relabel.add_argument("--keep", help="keep only metrics whose name matches this regex")
    relabel.add_argument("--drop", help="drop metrics whose name matches this regex")
    relabel.add_argument(
        "--expand-env",
        dest="relabel_expand_env",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="expand ${VAR} in the rules from the environment",
    )
    relabel.add_argument(
        "--name-validation",
        dest="name_validation",
        metavar="{utf8,legacy}",
        default=None,
        help="validate label names as Prometheus 3 does by default (utf8) or as 2.x does (legacy) "
        "[env PROXY_NAME_VALIDATION, default 'utf8']",
    )
    relabel.add_argument(
        "--format",
        choices=("text", "openmetrics"),
        default="text",
        help="the input's format (the output has the same)",
    )
    relabel.add_argument(
        "--escaping",
        choices=("allow-utf-8", "underscores", "dots", "values"),
        default="allow-utf-8",
        help="write names that are not legacy as a scraper asking for this escaping scheme gets them "
        "(allow-utf-8: quoted, as Prometheus 3 asks by default; Prometheus 2.x gets underscores)",
    )
    relabel.add_argument("input", nargs="?", default="-", help="exposition file, or - for stdin")
    relabel.set_defaults(func=_cmd_relabel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    known = {"serve", "fake-exporter", "demo", "check-config", "relabel", "-h", "--help", "--version"}
    if not argv or argv[0] not in known:
        argv.insert(0, "serve")  # the container runs `python -m proxy` with settings in env
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
