"""Findings as data against a real PostgreSQL: django_db.finding comes with a leak and goes with it."""

from __future__ import annotations

import time

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.evaluate.model import Finding, Status, Subject, finding_metrics, fold_subjects

from .conftest import wait_for


def finding_series(aggregator) -> dict[tuple[str, ...], float]:
    return {tuple(sorted(m.tags)): m.value for m in aggregator.metrics("django_db.finding")}


def test_a_leak_brings_its_finding_series_and_takes_it_away(aggregator, dd_run_check, sandbox, pg_instance, clients):
    server = f"postgres_server:127.0.0.1:{sandbox.postgres.port}"
    instance = {**pg_instance, "leak_idle_seconds": 1, "applications": {"include": ["^finding-"]}}
    check = DjangoDbCheck("django_db", {}, [instance])
    held = clients.many(3, app="finding-leaky")
    dd_run_check(check)
    assert "finding:leaked_connections" not in str(finding_series(aggregator))  # idle for less than a second
    time.sleep(1.2)
    held[2].execute("SELECT 1")  # the application goes on with another: the two left idle are its leak
    aggregator.reset()
    dd_run_check(check)
    leaks = {tags: v for tags, v in finding_series(aggregator).items() if "finding:leaked_connections" in tags}
    assert leaks == {tuple(sorted(["finding:leaked_connections", "app:finding-leaky", server, "env_name:test"])): 1}
    for conn in held[:2]:
        conn.close()
    wait_for(sandbox, "finding-leaky", 1)  # the server ends the backends once it reads the goodbye
    aggregator.reset()
    dd_run_check(check)
    assert not [tags for tags in finding_series(aggregator) if "finding:leaked_connections" in tags]
    check.cancel()


def test_a_leak_past_the_critical_threshold_is_2(aggregator, dd_run_check, sandbox, pg_instance, clients):
    instance = {
        **pg_instance,
        "leak_idle_seconds": 1,
        "applications": {"include": ["^finding-crit$"]},
        "thresholds": {"leaked_connections": {"warning": 1, "critical": 3}},
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    clients.many(3, app="finding-crit")
    time.sleep(1.2)
    dd_run_check(check)
    (value,) = [v for tags, v in finding_series(aggregator).items() if "app:finding-crit" in tags]
    assert value == 2
    check.cancel()


def test_a_folded_subject_is_named_after_its_own_kind():
    """Churn names applications and PgBouncer itself: past max_tag_values, the folded applications are
    `app:other`, never `pooler:other` because a pooler's subject happened to fold first."""
    subjects = (
        Subject(("app:web",), 40),
        Subject(("app:api",), 30),
        Subject(("pooler:pgbouncer",), 5),
        Subject(("app:cron",), 4),
        Subject(("app:admin",), 1),
    )
    finding = Finding("connection_churn", Status.WARNING, "churn", subjects=subjects)
    series = {tuple(m.tags) for m in finding_metrics([finding], 2)}
    assert series == {
        ("finding:connection_churn", "app:web"),
        ("finding:connection_churn", "app:api"),
        ("finding:connection_churn", "pooler:other"),
        ("finding:connection_churn", "app:other"),
    }
    [folded_apps] = [s for s in fold_subjects(subjects, 2) if s.tags == ("app:other",)]
    assert folded_apps.figure == 5
