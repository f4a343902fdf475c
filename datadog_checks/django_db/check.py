"""DjangoDbCheck: wires config, sources, evaluation and submission together.

Data flows one way: config -> sources (I/O, plain snapshots) -> evaluation (pure
functions: metrics, findings, alignment) -> submission.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from datadog_checks.base import AgentCheck

from . import config
from .alignment import alignment_failures
from .connection import scrub
from .health import pgbouncer_findings, postgres_findings, signature_findings
from .logs import LogFollower
from .model import Finding, Metric, Status, message, worst
from .pg_metrics import SessionHistory, postgres_metrics
from .pgb_metrics import pgbouncer_metrics
from .pgbouncer import PgBouncerSource, PgbSnapshot
from .postgres import PgSnapshot, PostgresSource
from .signatures import classify_error

POSTGRES_CAN_CONNECT = "django_db.postgres.can_connect"
PGBOUNCER_CAN_CONNECT = "django_db.pgbouncer.can_connect"
CONNECTION_HEALTH = "django_db.connection_health"
CONFIG_ALIGNMENT = "django_db.config_alignment"


class DjangoDbCheck(AgentCheck):
    __NAMESPACE__ = ""

    def __init__(self, name: str, init_config: Any, instances: list[dict]):
        super().__init__(name, init_config, instances)
        self.settings = config.parse(self.instance)
        s = self.settings
        self.postgres = PostgresSource(s.postgres, s.group_by, s.leak_idle_seconds, self.log) if s.postgres else None
        self.pgbouncer = PgBouncerSource(s.pgbouncer, self.log) if s.pgbouncer else None
        self.logs = LogFollower(s.log_files, s.log_max_bytes_per_run) if s.log_files else None
        self.sessions = SessionHistory()
        self._last_server_time: float | None = None
        self._log_problems: dict[str, str] = {}

    @property
    def health_tags(self) -> list[str]:
        endpoints = (self.settings.postgres, self.settings.pgbouncer)
        return [*(e.tag for e in endpoints if e), *self.settings.tags]

    # -- the run ---------------------------------------------------------------------------
    def check(self, _: Any) -> None:
        seen: list[tuple[str, str]] = []  # (signature, source) of every error met this run
        findings: list[Finding] = []
        pg = self.collect_postgres(self.postgres, seen, findings) if self.postgres else None
        pgb = self.collect_pgbouncer(self.pgbouncer, seen, findings) if self.pgbouncer else None
        if self.logs is not None:
            self.collect_logs(self.logs, seen)
        findings += signature_findings(seen)
        for signature, source in seen:
            self.count("django_db.errors", 1, tags=[f"signature:{signature}", f"source:{source}", *self.settings.tags])
        status = worst(findings)
        self.report(CONNECTION_HEALTH, status, self.health_tags, message(findings))
        if self.postgres and self.pgbouncer and pg and pgb:
            failures = alignment_failures(self.settings, pg, pgb)
            self.report(
                CONFIG_ALIGNMENT, Status.WARNING if failures else Status.OK, self.health_tags, "; ".join(failures)
            )

    def collect_postgres(self, source: PostgresSource, seen: list, findings: list) -> PgSnapshot | None:
        tags = [source.endpoint.tag, *self.settings.tags]
        try:
            snapshot = source.snapshot(self._last_server_time, self.settings.report_leak_queries)
        except Exception as e:
            self.report_error(e, "postgres", "PostgreSQL", source.endpoint, POSTGRES_CAN_CONNECT, tags, seen)
            return None
        self.service_check(POSTGRES_CAN_CONNECT, Status.OK, tags=tags)
        self._last_server_time = snapshot.server_time
        if snapshot.new_connection and not self.pgbouncer:
            self.set_metadata("version", snapshot.settings.version.split()[0])
        opened = self.sessions.opened_by_db(snapshot)
        metrics, folded = postgres_metrics(snapshot, self.settings, opened)
        for dimension, values in folded.items():
            self.log.debug("%d values of %s folded into `other`: %s", len(values), dimension, ", ".join(values))
        self.submit(metrics)
        churn = self.sessions.churn_per_minute(snapshot.server_time, sum(opened.values()))
        findings += postgres_findings(snapshot, self.settings, churn)
        return snapshot

    def collect_pgbouncer(self, source: PgBouncerSource, seen: list, findings: list) -> PgbSnapshot | None:
        tags = [source.endpoint.tag, *self.settings.tags]
        try:
            snapshot = source.snapshot()
        except Exception as e:
            self.report_error(e, "pgbouncer", "PgBouncer", source.endpoint, PGBOUNCER_CAN_CONNECT, tags, seen)
            return None
        self.service_check(PGBOUNCER_CAN_CONNECT, Status.OK, tags=tags)
        if snapshot.new_connection and snapshot.version:
            self.set_metadata("version", snapshot.version)
        self.submit(pgbouncer_metrics(snapshot, self.settings))
        findings += pgbouncer_findings(snapshot, self.settings)
        return snapshot

    def collect_logs(self, logs: LogFollower, seen: list) -> None:
        for name, count in logs.poll().items():
            seen += [(name, "log")] * count
        for path, problem in logs.problems.items():
            if self._log_problems.get(path) != problem:
                self.warning("Cannot read log file %s: %s", path, problem)
        self._log_problems = dict(logs.problems)

    def report_error(self, error: Exception, source: str, label: str, endpoint: config.Endpoint,
                     check: str, tags: list[str], seen: list) -> None:  # fmt: skip
        signature = classify_error(error)
        seen.append((signature.name, source))
        text = f"{label} {endpoint.server_tag}: {signature.name}: {scrub(str(error), endpoint)}. {signature.advice}"
        self.log.warning("%s", text)
        self.service_check(check, Status.CRITICAL, tags=tags, message=text)

    def report(self, check: str, status: Status, tags: list[str], text: str) -> None:
        """A service check; an OK one carries no message, as the Agent expects."""
        if status == Status.OK:
            self.service_check(check, status, tags=tags)
        else:
            self.service_check(check, status, tags=tags, message=text)

    # -- submission -------------------------------------------------------------------------
    def submit(self, metrics: Iterable[Metric]) -> None:
        for metric in metrics:
            getattr(self, metric.kind)(metric.name, metric.value, tags=list(metric.tags))

    def cancel(self) -> None:
        for resource in (self.postgres, self.pgbouncer, self.logs):
            if resource is not None:
                resource.close()
