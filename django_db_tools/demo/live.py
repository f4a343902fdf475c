"""The demo's live view: a few plain lines from what one check run submitted. No I/O."""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from ..cli import STATUS_NAMES

HEALTH = "django_db.connection_health"
WIDTH = 110  # findings are wrapped at this width, never cut
INDENT = " " * 13
FINDING_SEPARATOR = re.compile(r";\s+(?=(?:OK|WARNING|CRITICAL|UNKNOWN):)|\n")


def plural(count: float | None, word: str) -> str:
    """``1 slot``, ``3 slots``, ``n/a slots``."""
    return f"{_n(count)} {word if count == 1 else word + 's'}"


def wrap(text: str, indent: str = INDENT, hanging: str = "  ") -> list[str]:
    """The whole text, wrapped at WIDTH: later lines hang under the first."""
    lines = textwrap.wrap(
        text, WIDTH, initial_indent=indent, subsequent_indent=indent + hanging, break_on_hyphens=False
    )
    return lines or [indent.rstrip()]


def findings(message: str) -> list[str]:
    """The findings of a connection_health message, one string each."""
    return [part.strip() for part in FINDING_SEPARATOR.split(message or "") if part.strip()]


def _tag(tags: Iterable[str], key: str) -> str | None:
    prefix = key + ":"
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return None


class Figures:
    """The metrics and service checks of one run (stubs from datadog_checks.base.stubs.aggregator)."""

    def __init__(self, metrics: Sequence[Any], service_checks: Sequence[Any], error: str = ""):
        self.metrics: dict[str, list[Any]] = defaultdict(list)
        for stub in metrics:
            self.metrics[stub.name].append(stub)
        self.service_checks = {stub.name: stub for stub in service_checks}
        self.error = error

    def total(self, name: str) -> float | None:
        stubs = self.metrics.get(name)
        return sum(stub.value for stub in stubs) if stubs else None

    def highest(self, name: str) -> float | None:
        stubs = self.metrics.get(name)
        return max(stub.value for stub in stubs) if stubs else None

    def by(self, name: str, key: str) -> dict[str, float]:
        sums: dict[str, float] = defaultdict(float)
        for stub in self.metrics.get(name, ()):
            sums[_tag(stub.tags, key) or "none"] += stub.value
        return dict(sums)

    def status(self, name: str) -> str:
        stub = self.service_checks.get(name)
        return "n/a" if stub is None else STATUS_NAMES.get(stub.status, str(stub.status))


def _n(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = str(int(value)) if value == int(value) else f"{value:.1f}"
    return text + unit


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _ranked(counts: dict[str, float]) -> str:
    items = sorted(((k, v) for k, v in counts.items() if v), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{key} {_n(value)}" for key, value in items) or "none"


def render(run: Figures, traffic: str) -> list[str]:
    used = run.total("django_db.postgres.connections")
    available = run.total("django_db.postgres.connections_available")
    states = run.by("django_db.postgres.connections", "state")
    apps = run.by("django_db.postgres.connections", "app")
    lines = [
        f"  postgres   connections {_n(used)}"
        f" (utilisation {_pct(run.total('django_db.postgres.connection_utilization'))},"
        f" {plural(available, 'slot')} left)  by state: {_ranked(states)}  by app: {_ranked(apps)}",
        f"             leaked {_n(run.total('django_db.postgres.leaked_connections'))}"
        f"  waiting on a lock {_n(run.total('django_db.postgres.waiting_on_lock'))}"
        f"  oldest idle in transaction {_n(run.highest('django_db.postgres.idle_in_transaction.max_age'), 's')}",
        f"  pgbouncer  cl_active {_n(run.total('django_db.pgbouncer.pools.cl_active'))}"
        f"  cl_waiting {_n(run.total('django_db.pgbouncer.pools.cl_waiting'))}"
        f"  maxwait {_n(run.highest('django_db.pgbouncer.pools.maxwait'), 's')}"
        f"  sv_active {_n(run.total('django_db.pgbouncer.pools.sv_active'))}"
        f"  clients {_n(run.total('django_db.pgbouncer.clients'))}"
        f"/{_n(run.total('django_db.pgbouncer.max_client_conn'))}"
        f" ({_pct(run.total('django_db.pgbouncer.client_utilization'))})",
        f"  django     the processes' own counters: new connections/s"
        f" {_n(run.total('django_db.django.new_connections'))}"
        f"  failed/s {_n(run.total('django_db.django.connection_errors'))}"
        f"  errors/s {_n(run.total('django_db.django.errors'))}"
        f"  (endpoint {run.status('django_db.django.can_scrape')})",
        f"  requests   {traffic}",
    ]
    errors = run.by("django_db.errors", "signature")
    lines.append(
        f"  can_connect postgres {run.status('django_db.postgres.can_connect')},"
        f" pgbouncer {run.status('django_db.pgbouncer.can_connect')}"
        f"  errors this run: {_ranked(errors)}"
    )
    health = run.service_checks.get(HEALTH)
    lines.append(f"  health     {run.status(HEALTH)}")
    if health is not None and health.message:
        for finding in findings(health.message):
            lines += wrap(finding)
    if run.error:
        lines += wrap(f"check error: {run.error}", indent="  ")
    return lines
