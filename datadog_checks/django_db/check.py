"""DjangoDbCheck: wires config, sources, evaluation and submission together."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from datadog_checks.base import AgentCheck

from . import config
from .connection import scrub
from .model import Finding, Metric, Status
from .pg_metrics import SessionHistory, postgres_metrics
from .postgres import PgSnapshot, PostgresSource
from .signatures import Signature, classify_error

POSTGRES_CAN_CONNECT = "django_db.postgres.can_connect"


class DjangoDbCheck(AgentCheck):
    __NAMESPACE__ = ""

    def __init__(self, name: str, init_config: Any, instances: list[dict]):
        super().__init__(name, init_config, instances)
        self.settings = config.parse(self.instance)
        self.sessions = SessionHistory()
        self.postgres: PostgresSource | None = None
        if self.settings.postgres is not None:
            self.postgres = PostgresSource(
                self.settings.postgres, self.settings.group_by, self.settings.leak_idle_seconds, self.log
            )
        self._last_server_time: float | None = None

    # -- the run ---------------------------------------------------------------------------
    def check(self, _: Any) -> None:
        errors: list[tuple[Signature, str]] = []
        findings: list[Finding] = []
        if self.postgres is not None:
            self.collect_postgres(self.postgres, errors, findings)
        self.submit_errors(errors)

    def collect_postgres(self, source: PostgresSource, errors: list, findings: list) -> PgSnapshot | None:
        endpoint = source.endpoint
        tags = [f"postgres_server:{endpoint.server_tag}", *self.settings.tags]
        try:
            snapshot = source.snapshot(self._last_server_time, self.settings.report_leak_queries)
        except Exception as e:
            signature = classify_error(e)
            errors.append((signature, "postgres"))
            text = f"{signature.name}: {scrub(str(e), endpoint)}. {signature.advice}"
            self.log.warning("PostgreSQL %s: %s", endpoint.server_tag, text)
            self.service_check(POSTGRES_CAN_CONNECT, Status.CRITICAL, tags=tags, message=text)
            findings.append(Finding(signature.status, f"PostgreSQL {signature.name} ({scrub(str(e), endpoint)})"))
            return None
        self.service_check(POSTGRES_CAN_CONNECT, Status.OK, tags=tags)
        self._last_server_time = snapshot.server_time
        if snapshot.new_connection:
            self.set_metadata("version", snapshot.settings.version.split()[0])
        opened = self.sessions.opened_by_db(snapshot)
        metrics, folded = postgres_metrics(snapshot, self.settings, opened)
        for dimension, values in folded.items():
            self.log.debug(
                "%s: %d values of %s folded into `other`: %s",
                endpoint.server_tag, len(values), dimension, ", ".join(values),
            )  # fmt: skip
        self.submit(metrics)
        return snapshot

    # -- submission -------------------------------------------------------------------------
    def submit(self, metrics: Iterable[Metric]) -> None:
        for metric in metrics:
            getattr(self, metric.kind)(metric.name, metric.value, tags=list(metric.tags))

    def submit_errors(self, errors: list[tuple[Signature, str]]) -> None:
        for signature, source in errors:
            self.count(
                "django_db.errors", 1, tags=[f"signature:{signature.name}", f"source:{source}", *self.settings.tags]
            )

    def cancel(self) -> None:
        if self.postgres is not None:
            self.postgres.close()
