"""PgBouncer's clients by application and host (SHOW CLIENTS), against a real PgBouncer 1.18, Django
applications under gunicorn and plain psycopg clients."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD
from django_db_tools.webapp.harness import Database, Webapp

from .conftest import APP_PASSWORD, health, metric_values, one_value, run_new_check

CLIENTS = "django_db.pgbouncer.client_connections"
LEAKED = "django_db.pgbouncer.leaked_clients"


def through_pgbouncer(clients, sandbox, app: str, count: int, dbname: str = "appdb") -> list[psycopg.Connection]:
    conns = clients.many(count, app=app, dbname=dbname, port=sandbox.pgbouncer.port, prepare_threshold=None)
    for conn in conns:
        conn.execute("SELECT 1")
    return conns


def pgbouncer_only(sandbox, **options: object) -> dict:
    return {"pgbouncer": sandbox.pgbouncer.instance("datadog"), **options}


@pytest.fixture
def pgbouncer_settings(sandbox):
    """Changes to PgBouncer's settings for one test, undone after it."""
    before = dict(sandbox.pgbouncer.settings)

    def change(**settings: object) -> None:
        sandbox.pgbouncer.settings.update(settings)
        sandbox.pgbouncer.reload()

    yield change
    sandbox.pgbouncer.settings.clear()
    sandbox.pgbouncer.settings.update(before)
    sandbox.pgbouncer.reload()


def used_clients(sandbox) -> int:
    with psycopg.connect(
        host="127.0.0.1", port=sandbox.pgbouncer.port, user=SUPERUSER, password=SUPERUSER_PASSWORD,
        dbname="pgbouncer", autocommit=True, cursor_factory=psycopg.ClientCursor,
    ) as admin:  # fmt: skip
        lists = dict(admin.execute("SHOW LISTS").fetchall())
    return int(lists["used_clients"]) - 1  # not this one


def test_clients_by_application_state_and_host(aggregator, dd_run_check, sandbox, clients, webapps):
    through_pgbouncer(clients, sandbox, "by-app-jobs", 3)
    web = webapps(through="pgbouncer", app_name="by-app-web", threads=2, conn_max_age=None)
    assert {r.status for r in web.drive("/sleep/?seconds=0.3", count=2, concurrency=2)} == {200}

    run_new_check(aggregator, dd_run_check, pgbouncer_only(sandbox))
    tags = ("pgbouncer_db:appdb", "user:app", "state:idle")
    assert one_value(aggregator, CLIENTS, "app:by-app-jobs", *tags) == 3
    assert one_value(aggregator, CLIENTS, "app:by-app-web", *tags) == 2  # each gunicorn thread keeps its own
    assert metric_values(aggregator, LEAKED, "app:by-app-web", "pgbouncer_db:appdb") == []  # a zero is not sent
    # The host is opt-in, as on PostgreSQL's side; the check's own console connection is never counted.
    assert not any(t.startswith("client_addr:") for m in aggregator.metrics(CLIENTS) for t in m.tags)
    assert metric_values(aggregator, CLIENTS, "pgbouncer_db:pgbouncer") == []

    run_new_check(aggregator, dd_run_check, pgbouncer_only(sandbox, group_by=["app", "client_addr"]))
    assert one_value(aggregator, CLIENTS, "app:by-app-jobs", "client_addr:127.0.0.1", "state:idle") == 3
    assert not any(t.startswith(("pgbouncer_db:", "user:")) for m in aggregator.metrics(CLIENTS) for t in m.tags)


def test_idle_clients_past_their_threshold_are_leaks_postgresql_cannot_see(aggregator, dd_run_check, sandbox, webapps):
    # CONN_MAX_AGE=1: each thread closes its expired connection only when it serves its next request.
    web = webapps(through="pgbouncer", app_name="leaky-web", threads=4, conn_max_age=1)
    assert {r.status for r in web.drive("/sleep/?seconds=0.3", count=4, concurrency=4)} == {200}
    # PgBouncer's server connections go (a restart of PostgreSQL would do the same); its clients stay.
    sandbox.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'leaky-web'")
    time.sleep(3.2)
    instance = {
        **sandbox.instance(),
        "conn_max_age": 1,
        "leak_idle_seconds": 2,
        "applications": {"include": ["^leaky-web$"]},
        "group_by": ["db", "user", "app", "client_addr"],
    }
    status, text = health(aggregator, dd_run_check, instance)
    assert status == AgentCheck.WARNING
    assert one_value(aggregator, LEAKED, "app:leaky-web", "pgbouncer_db:appdb", "user:app") == 4
    assert one_value(aggregator, CLIENTS, "app:leaky-web", "state:idle", "client_addr:127.0.0.1") == 4
    # PostgreSQL has none of them.
    assert metric_values(aggregator, "django_db.postgres.connections", "app:leaky-web") == []
    assert "4 client connections of app=leaky-web held at PgBouncer idle for over 2 s (leaked" in text
    assert "from 127.0.0.1 4 on pool appdb/app 4: in transaction mode they pin no server connection" in text
    assert "far longer than its CONN_MAX_AGE=1 s" in text and "client_idle_timeout" in text

    web.drive("/query/", count=8, concurrency=4)  # the threads serve again and close what expired
    _, text = health(aggregator, dd_run_check, instance)
    assert "leaky-web held at PgBouncer" not in text


def test_max_client_conn_reached_names_the_holding_application(
    aggregator, dd_run_check, sandbox, clients, pgbouncer_settings
):
    room = 6
    pgbouncer_settings(max_client_conn=used_clients(sandbox) + 1 + room)  # and the check's console connection
    instance = {**pgbouncer_only(sandbox), "log_files": [str(sandbox.pgbouncer.logfile)]}
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        dd_run_check(check)  # the console connection is open, the log followed from here
        through_pgbouncer(clients, sandbox, "hog-report", room - 1)
        through_pgbouncer(clients, sandbox, "hog-web", 1)
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            through_pgbouncer(clients, sandbox, "hog-late", 1)
        time.sleep(0.2)  # PgBouncer writes its log line
        aggregator.reset()
        dd_run_check(check)
    finally:
        check.cancel()
    message = aggregator.service_checks("django_db.connection_health")[-1].message
    print(message)
    assert aggregator.service_checks("django_db.connection_health")[-1].status == AgentCheck.CRITICAL
    assert "PgBouncer client connections in use (100% of max_client_conn); held most by app=hog-report 5" in message
    assert "max_client_conn seen (1 from log)" in message
    assert "PgBouncer's client connections now: app=hog-report 5 (from 127.0.0.1 5)" in message
    # The utilisation finding's series name the holders, so that a monitor can say who.
    finding = [
        m.tags for m in aggregator.metrics("django_db.finding") if "finding:pgbouncer_client_utilization" in m.tags
    ]
    assert {"app:hog-report", "app:hog-web"} <= {t for tags in finding for t in tags}


def test_waiting_clients_are_named_by_application(aggregator, dd_run_check, sandbox, clients):
    port = sandbox.postgres.port
    sandbox.pgbouncer.databases["narrow"] = f"host=127.0.0.1 port={port} dbname=appdb pool_size=1"
    sandbox.pgbouncer.reload()
    threads = []
    try:
        (holder,) = through_pgbouncer(clients, sandbox, "wait-batch", 1, "narrow")
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # the pool's only server connection
        waiters = clients.many(2, app="wait-api", dbname="narrow", port=sandbox.pgbouncer.port, prepare_threshold=None)
        waiters += clients.many(1, app="wait-web", dbname="narrow", port=sandbox.pgbouncer.port, prepare_threshold=None)
        threads = [threading.Thread(target=w.execute, args=("SELECT 1",), daemon=True) for w in waiters]
        for thread in threads:
            thread.start()
        time.sleep(1.2)  # past pgbouncer_maxwait_seconds' warning
        _, text = health(aggregator, dd_run_check, pgbouncer_only(sandbox))
        assert "3 clients waiting at PgBouncer pool narrow/app" in text
        assert "(app=wait-api 2, app=wait-web 1)" in text
        assert one_value(aggregator, CLIENTS, "app:wait-api", "pgbouncer_db:narrow", "state:waiting") == 2
        assert one_value(aggregator, CLIENTS, "app:wait-batch", "pgbouncer_db:narrow", "state:active") == 1
        holder.execute("COMMIT")
        for thread in threads:
            thread.join(5)
    finally:
        del sandbox.pgbouncer.databases["narrow"]
        sandbox.pgbouncer.reload()


HOSTILE = ("ünïcødé-名前", "x" * 63, "a.*b+c?(d)[e]{2}|^$\\", "comma,and:colon", "  spaced  ", "%s%n{0}")


def test_hostile_application_names_fold_into_other(aggregator, dd_run_check, sandbox, clients, pgbouncer_settings):
    pgbouncer_settings(max_client_conn=used_clients(sandbox) + 320)
    names = [f"{HOSTILE[i % len(HOSTILE)]}{i}"[-63:] for i in range(300)]
    for name in names:
        clients.connect(app=name, port=sandbox.pgbouncer.port, prepare_threshold=None)
    time.sleep(2.1)  # every one idle past leak_idle_seconds
    instance = pgbouncer_only(sandbox, max_tag_values=10, leak_idle_seconds=1, apps=[{"match": "^a.*b"}])
    _, text = health(aggregator, dd_run_check, instance)
    app_tags = {t for m in aggregator.metrics(CLIENTS) for t in m.tags if t.startswith("app:")}
    assert "app:other" in app_tags and len(app_tags) <= 11
    leaked_tags = {t for m in aggregator.metrics(LEAKED) for t in m.tags if t.startswith("app:")}
    assert "app:other" in leaked_tags and len(leaked_tags) <= 11
    assert sum(metric_values(aggregator, CLIENTS, "pgbouncer_db:appdb")) >= 300
    # Findings name a few applications and count the rest; their series name at most 10 applications and other.
    assert "more applications" in text
    finding_apps = {t for m in aggregator.metrics("django_db.finding") for t in m.tags if t.startswith("app:")}
    assert "app:other" in finding_apps and len(finding_apps) <= 11


def test_before_1_18_clients_are_counted_by_what_exists():
    """PgBouncer 1.15's SHOW CLIENTS columns (no application_name): every client counts under app:none."""
    from datadog_checks.django_db.sources.pgbouncer import Result
    from datadog_checks.django_db.sources.pgbouncer_clients import parse_clients

    columns = ("type", "user", "database", "state", "addr", "port", "local_addr", "local_port", "connect_time",
               "request_time", "wait", "wait_us", "close_needed", "ptr", "link", "remote_pid", "tls")  # fmt: skip
    row = dict.fromkeys(columns, "")
    rows = [
        {**row, "user": "app", "database": "appdb", "state": "active", "addr": "10.0.0.7",
         "request_time": "2026-12-05 01:00:00 UTC"},
        {**row, "user": "app", "database": "appdb", "state": "active", "addr": "10.0.0.7",
         "request_time": "2026-12-05 01:00:00 UTC"},
        {**row, "user": "app", "database": "appdb", "state": "active", "addr": "10.0.0.8", "link": "0x1",
         "request_time": "2026-12-05 01:10:00 UTC"},
        {**row, "user": "datadog", "database": "pgbouncer", "state": "active",
         "request_time": "2026-12-05 01:20:00 UTC"},
    ]  # fmt: skip
    clients = parse_clients(Result.from_dicts(rows))
    assert not clients.has_app and clients.now == "2026-12-05 01:20:00 UTC"
    assert sorted((g.app, g.addr, g.linked, g.connections) for g in clients.groups) == [
        ("", "10.0.0.7", False, 2),
        ("", "10.0.0.8", True, 1),
    ]


def test_a_budget_counts_the_clients_at_pgbouncer_in_transaction_mode(aggregator, dd_run_check, sandbox):
    # One server connection for the pool: PostgreSQL sees at most one backend, whatever the threads hold.
    port = sandbox.postgres.port
    sandbox.pgbouncer.databases["onebudget"] = f"host=127.0.0.1 port={port} dbname=appdb pool_size=1"
    sandbox.pgbouncer.reload()
    db = Database("127.0.0.1", sandbox.pgbouncer.port, "onebudget", "app", APP_PASSWORD)
    try:
        with Webapp(db, app_name="budget-pgb", threads=4, conn_max_age=None) as web:
            statuses = web.drive("/sleep/?seconds=0.3", count=4, concurrency=4)
            assert {r.status for r in statuses} == {200}
            instance = {**sandbox.instance(), "apps": [{"match": "^budget-pgb$", "max_connections": 3}]}
            status, text = health(aggregator, dd_run_check, instance)
    finally:
        del sandbox.pgbouncer.databases["onebudget"]
        sandbox.pgbouncer.reload()
    assert status == AgentCheck.WARNING
    assert "app=budget-pgb holds 4 connections, over its budget of 3, 4 of them client connections at PgBouncer" in text
    assert one_value(aggregator, "django_db.app.connections", "app:budget-pgb", "counted_at:pgbouncer") == 4
    # PgBouncer's server connection, which carries the application's name at PostgreSQL, is not the application's.
    assert one_value(aggregator, "django_db.app.connections", "app:budget-pgb", "counted_at:postgres") == 0
    assert one_value(aggregator, "django_db.app.budget_utilization", "app:budget-pgb") == pytest.approx(4 / 3)


def test_a_hung_pgbouncer_times_out_and_the_postgresql_side_still_reports(aggregator, dd_run_check, sandbox):
    instance = {
        **sandbox.instance(),
        "pgbouncer": {**sandbox.pgbouncer.instance("datadog"), "query_timeout": 1},
        "apps": [{"match": "^hung-web$", "max_connections": 2}],
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        dd_run_check(check)  # the console connection is open: the next run's SHOW statements hang
        sandbox.pgbouncer.pause()
        try:
            aggregator.reset()
            dd_run_check(check)
        finally:
            sandbox.pgbouncer.resume()
    finally:
        check.cancel()
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.CRITICAL)
    aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.OK)
    assert "connect_timeout" in aggregator.service_checks("django_db.pgbouncer.can_connect")[0].message
    assert metric_values(aggregator, CLIENTS) == []
    # The budget is counted where it could be read; its utilisation waits for both sides.
    assert one_value(aggregator, "django_db.app.connections", "app:hung-web", "counted_at:postgres") == 0
    assert metric_values(aggregator, "django_db.app.connections", "counted_at:pgbouncer") == []
    assert metric_values(aggregator, "django_db.app.budget_utilization") == []
