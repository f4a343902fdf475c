"""No false alarms: backends still starting are not hidden ones; settings are judged where they apply."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import Sandbox

from .conftest import APP_PASSWORD, Clients, metric_values


@contextmanager
def churn(sandbox: Sandbox, user: str, password: str, threads: int = 3) -> Iterator[None]:
    """Threads that connect and disconnect as fast as they can until the block ends."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                psycopg.connect(
                    host="127.0.0.1", port=sandbox.postgres.port, user=user, password=password,
                    dbname="appdb", application_name="churn", connect_timeout=5,
                ).close()  # fmt: skip
            except psycopg.OperationalError:
                time.sleep(0.01)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)


def runs_under_churn(
    aggregator, dd_run_check, check: DjangoDbCheck, states: tuple[str, ...] = ("starting",), enough: int = 5
) -> Iterator[str]:
    """Runs of the check until it has counted ``enough`` connections in ``states`` (at most 600 runs or
    90 s): yields each run's connection_health message."""
    seen, deadline = 0.0, time.monotonic() + 90
    for _ in range(600):
        if seen >= enough or time.monotonic() > deadline:
            break
        aggregator.reset()
        dd_run_check(check)
        for state in states:
            seen += sum(metric_values(aggregator, "django_db.postgres.connections", f"state:{state}"))
        yield aggregator.service_checks("django_db.connection_health")[-1].message or ""
    assert seen >= 1, f"the churn never showed a backend in {states}"


def test_starting_backends_are_not_hidden_from_a_pg_monitor_role(aggregator, dd_run_check, pg_instance, sandbox):
    check = DjangoDbCheck("django_db", {}, [pg_instance])
    try:
        with churn(sandbox, "app", APP_PASSWORD):
            # Counting the hidden ones too: each would be a false alarm.
            for text in runs_under_churn(aggregator, dd_run_check, check, ("starting", "unknown")):
                assert "hidden" not in text, text
                assert metric_values(aggregator, "django_db.postgres.connections", "state:unknown") == []
    finally:
        check.cancel()


def test_a_role_without_pg_monitor_counts_only_the_backends_really_hidden(
    aggregator, dd_run_check, sandbox, clients: Clients
):
    # `plain` sees its own backends in full, starting ones included; `app`'s two are hidden from it.
    clients.many(2, app="hidden-app")
    check = DjangoDbCheck("django_db", {}, [{"postgres": sandbox.postgres.instance("plain", APP_PASSWORD)}])
    try:
        with churn(sandbox, "plain", APP_PASSWORD):
            for text in runs_under_churn(aggregator, dd_run_check, check):
                assert "WARNING: 2 backends are hidden from the monitoring role: GRANT pg_monitor TO plain" in text
    finally:
        check.cancel()
