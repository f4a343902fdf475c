"""Command line: run the check outside an Agent, or start the sandbox demo.

    python -m django_db_tools check [-c conf.yaml] [-t N] [-r] [--json | --table]
    python -m django_db_tools demo [--duration S] [--phase-seconds S] [--interval S]

``check`` runs every instance of a conf.yaml the way ``datadog-agent check`` does and prints
what the check submitted. Metrics are those of the last run, flushed like the Agent flushes:
gauges keep their last value, counts are summed, and rates and monotonic counts are computed
between the last two runs (so they show with ``-r`` or ``-t 2`` and up).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

EXAMPLE_CONF = Path(__file__).parent / "data" / "conf.yaml.example"
DEFAULT_CONF = "conf.yaml"
CHECK_NAME = "django_db"
EXIT_OK, EXIT_CHECK_ERRORS, EXIT_USAGE = 0, 1, 2
STATUS_NAMES = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
DEFAULT_INTERVAL = 15
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class CliError(Exception):
    """A problem the user has to fix before anything runs; printed, and the exit status is 2."""


# -- reading conf.yaml ---------------------------------------------------------------------------
def load_config(path: Path) -> tuple[dict, list[dict]]:
    import yaml

    if not path.exists():
        raise CliError(
            f"configuration file not found: {path}. Pass one with -c PATH, or create ./{DEFAULT_CONF} "
            f"(start from {EXAMPLE_CONF})"
        )
    try:
        text = path.read_text()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(document, Mapping):
        raise CliError(f"{path}: expected a mapping with `init_config` and `instances`")
    init_config = document.get("init_config") or {}
    if not isinstance(init_config, Mapping):
        raise CliError(f"{path}: `init_config` must be a mapping")
    instances = document.get("instances")
    if not isinstance(instances, list) or not instances:
        raise CliError(f"{path}: `instances` must be a non-empty list")
    for index, instance in enumerate(instances, 1):
        if not isinstance(instance, Mapping):
            raise CliError(f"{path}: instance {index} must be a mapping")
    return dict(init_config), [dict(i) for i in instances]


def redact(text: str) -> str:
    """The check's own masking of secrets, imported when first needed."""
    from datadog_checks.django_db.redact import redact as mask

    return mask(text)


class RedactingFilter(logging.Filter):
    """Keeps passwords out of log lines: masks connection parameters and URLs (see redact.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


# -- running and flushing ------------------------------------------------------------------------
@dataclass
class Run:
    timestamp: float
    duration: float
    metrics: list[Any]  # MetricStub
    service_checks: list[Any]  # ServiceCheckStub
    error: str
    warnings: list[str]


@dataclass
class InstanceResult:
    index: int
    check_id: str
    label: str
    interval: int
    runs: list[Run] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(1 for run in self.runs if run.error)

    @property
    def warnings(self) -> int:
        return sum(len(run.warnings) for run in self.runs)


def _context(stub: Any) -> tuple:
    return (stub.name, tuple(sorted(stub.tags or ())), stub.hostname or "")


def flush(runs: Sequence[Run]) -> list[dict]:
    """What the Agent's aggregator would send after the last run, as (name, type, value, tags, host, ts)."""
    if not runs:
        return []
    last = runs[-1]
    previous: dict[tuple, Any] = {}
    if len(runs) > 1:
        for stub in runs[-2].metrics:
            previous[_context(stub)] = stub
    flushed: dict[tuple, dict] = {}
    for stub in last.metrics:
        key = _context(stub)
        kind = {0: "gauge", 1: "rate", 2: "count", 3: "monotonic_count"}.get(stub.type, "gauge")
        value = float(stub.value)
        if kind == "count" and key in flushed:
            flushed[key]["value"] += value
            continue
        if kind in ("rate", "monotonic_count"):
            before = previous.get(key)
            if before is None:
                if kind == "rate" or not stub.flush_first_value:
                    continue
            else:
                delta = value - float(before.value)
                if delta < 0:  # a reset: the Agent drops the sample
                    continue
                elapsed = last.timestamp - runs[-2].timestamp
                if kind == "rate":
                    if elapsed <= 0:
                        continue
                    value = delta / elapsed
                else:
                    value = delta
        flushed[key] = {"name": stub.name, "type": kind, "value": value, "tags": list(key[1]), "host": key[2]}
    return sorted(flushed.values(), key=lambda m: (m["name"], m["tags"]))


def run_instance(check: Any, result: InstanceResult, times: int, pause: float) -> None:
    from datadog_checks.base.stubs import aggregator

    for number in range(times):
        if number and pause:
            time.sleep(pause)
        aggregator.reset()
        started = time.monotonic()
        error = check.run()
        duration = time.monotonic() - started
        metrics = [stub for name in aggregator.metric_names for stub in aggregator.metrics(name)]
        checks = [stub for name in aggregator.service_check_names for stub in aggregator.service_checks(name)]
        result.runs.append(Run(time.time(), duration, metrics, checks, error, list(check.get_warnings())))
    aggregator.reset()


def _label(instance: Mapping[str, Any]) -> str:
    parts = []
    for section in ("postgres", "pgbouncer"):
        endpoint = instance.get(section)
        if isinstance(endpoint, Mapping):
            parts.append(f"{section} {endpoint.get('host', 'localhost')}:{endpoint.get('port', '')}".rstrip(":"))
    return ", ".join(parts)


def _check_id(instance: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(instance, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{CHECK_NAME}:{digest}"


def _error_messages(report: str) -> list[str]:
    try:
        return [str(item.get("message", "")) for item in json.loads(report)]
    except (ValueError, AttributeError, TypeError):
        return [report]


# -- output --------------------------------------------------------------------------------------
def _value(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def agent_json(results: Sequence[InstanceResult], config_source: str) -> list[dict]:
    from datadog_checks.django_db import __version__

    hostname = socket.gethostname()
    out = []
    for result in results:
        last = result.runs[-1]
        ts = int(last.timestamp)
        metrics = [
            {
                "metric": m["name"],
                "points": [[ts, m["value"]]],
                "tags": m["tags"],
                "host": m["host"] or hostname,
                "type": m["type"],
                "interval": 0 if m["type"] == "gauge" else result.interval,
                "source_type_name": "System",
            }
            for m in flush(result.runs)
        ]
        service_checks = [
            {
                "check": sc.name,
                "host_name": sc.hostname or hostname,
                "status": sc.status,
                "timestamp": ts,
                "message": sc.message or "",
                "tags": list(sc.tags or ()),
            }
            for sc in last.service_checks
        ]
        durations = [run.duration for run in result.runs]
        last_error = next((run.error for run in reversed(result.runs) if run.error), "")
        runner = {
            "CheckName": CHECK_NAME,
            "CheckVersion": __version__,
            "CheckConfigSource": config_source,
            "CheckID": result.check_id,
            "Interval": result.interval,
            "TotalRuns": len(result.runs),
            "TotalErrors": result.errors,
            "TotalWarnings": result.warnings,
            "MetricSamples": len(last.metrics),
            "TotalMetricSamples": sum(len(run.metrics) for run in result.runs),
            "ServiceChecks": len(last.service_checks),
            "TotalServiceChecks": sum(len(run.service_checks) for run in result.runs),
            "Events": 0,
            "TotalEvents": 0,
            "AverageExecutionTime": round(1000 * sum(durations) / len(durations)),
            "LastExecutionTime": round(1000 * durations[-1]),
            "LastError": last_error,
            "LastWarnings": last.warnings,
            "UpdateTimestamp": ts,
        }
        aggregator = {"metrics": metrics, "sketches": [], "service_checks": service_checks, "events": []}
        out.append({"aggregator": aggregator, "runner": runner, "inventories": {}})
    return out


def _summary(result: InstanceResult, total: int) -> list[str]:
    head = f"=== {CHECK_NAME}, instance {result.index} of {total}"
    head += f" ({result.label}) ===" if result.label else " ==="
    last = result.runs[-1]
    lines = [
        head,
        f"Runs: {len(result.runs)}  Errors: {result.errors}  Warnings: {result.warnings}"
        f"  Last run: {1000 * last.duration:.0f} ms  Check ID: {result.check_id}",
    ]
    if last.error:
        lines.append("Error in the last run:")
        lines += [f"  {message}" for message in _error_messages(last.error)]
    if last.warnings:
        lines.append("Warnings in the last run:")
        lines += [f"  {warning}" for warning in last.warnings]
    return lines


def text_output(results: Sequence[InstanceResult]) -> str:
    lines: list[str] = []
    for result in results:
        if lines:
            lines.append("")
        lines += _summary(result, len(results))
        metrics = flush(result.runs)
        lines.append(f"Metrics ({len(metrics)}):")
        for m in metrics:
            tags = ", ".join(m["tags"])
            lines.append(f"  {m['name']} = {_value(m['value'])} ({m['type']})" + (f"  [{tags}]" if tags else ""))
        checks = result.runs[-1].service_checks
        lines.append(f"Service checks ({len(checks)}):")
        for sc in checks:
            tags = ", ".join(sc.tags or ())
            lines.append(f"  {sc.name}: {STATUS_NAMES.get(sc.status, sc.status)}" + (f"  [{tags}]" if tags else ""))
            for message_line in (sc.message or "").splitlines():
                lines.append(f"      {message_line}")
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    out = []
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.append("  ".join(cells).rstrip())
    return out


def table_output(results: Sequence[InstanceResult]) -> str:
    lines: list[str] = []
    for result in results:
        if lines:
            lines.append("")
        lines += _summary(result, len(results))
        lines.append("")
        rows = [[m["name"], m["type"], _value(m["value"]), ",".join(m["tags"])] for m in flush(result.runs)]
        lines += _table(["METRIC", "TYPE", "VALUE", "TAGS"], rows)
        lines.append("")
        rows = [
            [
                sc.name,
                str(STATUS_NAMES.get(sc.status, sc.status)),
                ",".join(sc.tags or ()),
                " | ".join((sc.message or "").splitlines()),
            ]
            for sc in result.runs[-1].service_checks
        ]
        lines += _table(["SERVICE CHECK", "STATUS", "TAGS", "MESSAGE"], rows)
    return "\n".join(lines) + "\n"


# -- commands ------------------------------------------------------------------------------------
def command_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from datadog_checks.base import ConfigurationError

    from datadog_checks.django_db import DjangoDbCheck

    path = Path(args.conf)
    try:
        init_config, instances = load_config(path)
        checks = []
        for index, instance in enumerate(instances, 1):
            try:
                check = DjangoDbCheck(CHECK_NAME, init_config, [instance])
            except ConfigurationError as e:
                raise CliError(f"invalid configuration in {path}, instance {index}: {e}") from None
            check.check_id = _check_id(instance)
            checks.append((index, instance, check))
    except CliError as e:
        err.write(redact(f"django_db check: {e}\n"))
        return EXIT_USAGE
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())

    times = max(args.check_times, 2) if args.check_rate else args.check_times
    pause = 1.0 if args.check_rate else args.pause / 1000.0
    results = []
    for index, instance, check in checks:
        interval = instance.get("min_collection_interval", init_config.get("min_collection_interval"))
        result = InstanceResult(index, check.check_id, _label(instance), int(interval or DEFAULT_INTERVAL))
        try:
            run_instance(check, result, times, pause)
        finally:
            cancel = getattr(check, "cancel", None)
            if cancel is not None:
                cancel()
        results.append(result)

    if args.json:
        text = json.dumps(agent_json(results, str(path)), indent=2) + "\n"
    elif args.table:
        text = table_output(results)
    else:
        text = text_output(results)
    out.write(redact(text))
    failed = sum(result.errors for result in results)
    if failed:
        err.write(f"django_db check: {failed} of {times * len(results)} runs failed\n")
        return EXIT_CHECK_ERRORS
    return EXIT_OK


def command_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.mysql:
        from .demo import mysql_main

        return mysql_main(phase_seconds=args.phase_seconds, interval=args.interval, out=out, err=err)
    from .demo import main as demo_main

    return demo_main(duration=args.duration, phase_seconds=args.phase_seconds, interval=args.interval, out=out, err=err)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m django_db_tools",
        description="Django database connections on PostgreSQL and PgBouncer: run the check, or the demo.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="run the check like `datadog-agent check` and print what it submitted",
        description="Run every instance of a conf.yaml like `datadog-agent check` and print what the check "
        "submitted. Exit status: 0 success, 1 when a run failed, 2 when the configuration is missing or invalid.",
    )
    check.add_argument("-c", "--conf", default=DEFAULT_CONF, help="the configuration file (default: ./conf.yaml)")
    check.add_argument("-t", "--check-times", type=_positive_int, default=1, metavar="N", help="run N times")
    check.add_argument(
        "-r", "--check-rate", action="store_true", help="run twice, one second apart, so that rates show"
    )
    check.add_argument("--pause", type=int, default=0, metavar="MS", help="milliseconds between runs with -t")
    output = check.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the Agent's JSON")
    output.add_argument("--table", action="store_true", help="print aligned tables")

    demo = commands.add_parser(
        "demo",
        help="a throwaway PostgreSQL, PgBouncer and Django application, driven through trouble",
        description="Start a throwaway PostgreSQL and PgBouncer and a small Django application, drive it "
        "through healthy traffic, a connection leak, a stuck transaction and saturation, and show what the "
        "check sees. Needs `pip install 'datadog-django-db[demo]'`.",
    )
    demo.add_argument("--duration", type=float, default=90, metavar="S", help="total seconds (default 90)")
    demo.add_argument(
        "--phase-seconds", type=float, default=None, metavar="S", help="seconds per phase (default: from --duration)"
    )
    demo.add_argument(
        "--interval", type=float, default=None, metavar="S", help="seconds between check runs (default 3)"
    )
    demo.add_argument("--fast", action="store_true", help="short phases: --phase-seconds 6 --interval 1")
    demo.add_argument("--mysql", action="store_true", help="the demo on a throwaway MariaDB instead")
    return parser


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    # The base package's test stub refuses generic tag keys (service, env, version...) in submissions, a
    # rule meant for integrations' own tags. The Agent accepts the instance `tags` a user sets, such as
    # `service:shop`, and so does this runner.
    os.environ.setdefault("DDEV_SKIP_GENERIC_TAGS_CHECK", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, os.environ.get("DD_LOG_LEVEL", "WARNING").upper(), logging.WARNING)
    logging.basicConfig(level=level if isinstance(level, int) else logging.WARNING, stream=err, format=LOG_FORMAT)
    if args.command == "check":
        return command_check(args, out, err)
    if args.command == "demo":
        if args.fast:
            args.phase_seconds = args.phase_seconds or 6
            args.interval = args.interval or 1
        return command_demo(args, out, err)
    parser.print_help(out)
    return EXIT_USAGE
