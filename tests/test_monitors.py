"""Every shipped monitor, evaluated on what the check sent against real faulty stacks (tests/monitors.py reads
their queries and thresholds as Datadog does): each fault fires the monitor meant for it, grouped by the
application to blame where there is one, and nothing else; a healthy stack fires none."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import PgBouncer, Sandbox

from .conftest import Clients
from .monitors import Monitor, Run, fired, recorded

LEAK = 1  # seconds: the leak threshold of the faulty stacks
TX = {"warning": 1, "critical": 2}  # idle_in_transaction_seconds of the faulty stacks


def runs_of(aggregator, instance: dict, count: int = 2) -> list[Run]:
    """What ``count`` runs of one new check on ``instance`` sent, run by run."""
    check = DjangoDbCheck("django_db", {}, [instance])
    runs = []
    try:
        for _ in range(count):
            aggregator.reset()
            assert check.run() == ""
            runs.append(recorded(aggregator))
    finally:
        check.cancel()
        aggregator.reset()
    return runs


@pytest.fixture
def crowded(sandbox: Sandbox) -> Iterator[PgBouncer]:
    """A PgBouncer of 10 client slots in front of the sandbox's PostgreSQL."""
    settings = {**sandbox.pgbouncer.settings, "max_client_conn": 10}
    bouncer = PgBouncer(sandbox.root / "crowded", sandbox.postgres, dict(sandbox.pgbouncer.users), None, **settings)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


def test_each_fault_fires_its_monitor_by_application_and_a_healthy_stack_none(aggregator, sandbox, crowded):
    clients = Clients(sandbox)
    bouncer = sandbox.pgbouncer.port
    try:
        # healthy: connections kept idle between requests, directly and through PgBouncer, one in use
        for conn in clients.many(3, app="web") + clients.many(
            3, app="pooled-web", port=bouncer, prepare_threshold=None
        ):
            conn.execute("SELECT 1")
        clients.connect(app="web").pgconn.send_query(b"SELECT pg_sleep(3)")
        healthy = {**sandbox.instance(), "apps": [{"match": "^web$", "max_connections": 8}]}
        assert fired(runs_of(aggregator, healthy, 3)) == {}
        clients.close()

        # a direct leak, a leak behind transaction pooling, a transaction left open
        for conn in clients.many(2, app="direct-leak") + clients.many(
            2, app="pooled-leak", port=bouncer, prepare_threshold=None
        ):
            conn.execute("SELECT 1")
        clients.connect(app="open-tx").execute("BEGIN").execute("SELECT 1")
        time.sleep(TX["critical"] + 0.2)
        faulty = {**sandbox.instance(), "leak_idle_seconds": LEAK, "thresholds": {"idle_in_transaction_seconds": TX}}
        assert fired(runs_of(aggregator, faulty)) == {
            "leaked_connections": {("app:direct-leak",): "Warn", ("app:pooled-leak",): "Warn"},
            "idle_in_transaction": {("app:open-tx",): "Alert"},
        }

        # an application over its budget, counted at PgBouncer only (an instance without a postgres section)
        for conn in clients.many(2, app="budget-app", port=bouncer, prepare_threshold=None):
            conn.execute("SELECT 1")
        budget = {"pgbouncer": sandbox.pgbouncer.instance(), "apps": [{"match": "^budget-app$", "max_connections": 1}]}
        assert fired(runs_of(aggregator, budget)) == {"app_budget": {("app:budget-app",): "Alert"}}

        # five leaked connections of one application are critical with the default thresholds
        for conn in clients.many(3, app="direct-leak"):
            conn.execute("SELECT 1")
        time.sleep(2 * LEAK + 0.2)  # budget-app's clients too, idle since before it
        assert fired(runs_of(aggregator, {**sandbox.instance(), "leak_idle_seconds": LEAK})) == {
            "leaked_connections": {
                ("app:direct-leak",): "Alert",
                ("app:pooled-leak",): "Warn",
                ("app:budget-app",): "Warn",
            }
        }

        # PgBouncer's client slots nearly all taken, read by an instance of its own (the check's own console
        # connection is the tenth)
        for conn in clients.many(9, app="crowd", port=crowded.port, prepare_threshold=None):
            conn.execute("SELECT 1")
        full = {"pgbouncer": crowded.instance()}
        assert fired(runs_of(aggregator, full)) == {
            "pgbouncer_client_utilization": {(f"pgbouncer_server:127.0.0.1:{crowded.port}",): "Alert"}
        }
    finally:
        clients.close()


def test_the_evaluator_reads_scopes_groups_and_levels_as_datadog_does():
    """A series without a group-by tag is left out, an OR scope keeps either value, a ! scope drops one, space
    then time aggregation, critical before warning."""
    leak = Monitor("m", "max(last_5m):max:django_db.finding{finding:a OR finding:b} by {app} >= 2", 2, 1)
    run = Run(
        metrics=[
            ("django_db.finding", 1, ("finding:a", "app:x")),
            ("django_db.finding", 2, ("finding:b", "app:y")),
            ("django_db.finding", 2, ("finding:c", "app:z")),
            ("django_db.finding", 2, ("finding:a", "user:u")),
        ]
    )
    assert leak.evaluate([run]) == {("app:x",): "Warn", ("app:y",): "Alert"}
    errors = Monitor(
        "e", "sum(last_10m):sum:django_db.errors{source:log,!signature:s} by {signature}.as_count() > 3", 3, 1
    )
    one = Run(
        metrics=[
            ("django_db.errors", 2, ("source:log", "signature:t")),
            ("django_db.errors", 9, ("signature:s", "source:log")),
        ]
    )
    assert errors.evaluate([one]) == {("signature:t",): "Warn"}
    assert errors.evaluate([one, one]) == {("signature:t",): "Alert"}
    down = Monitor(
        "c", '"django_db.postgres.can_connect".over("*").by("postgres_server").last(3).count_by_status()', 2, 1
    )
    tags = ("postgres_server:h:1",)
    assert down.evaluate([Run(service_checks=[("django_db.postgres.can_connect", 2, tags)])]) == {}
    assert down.evaluate([Run(service_checks=[("django_db.postgres.can_connect", 2, tags)])] * 2) == {tags: "Alert"}
