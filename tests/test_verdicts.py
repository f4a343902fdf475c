"""Verdicts about real Django applications under gunicorn that must not mislead: churn with its name and
no churn for a burst, a client-side pool that runs out, one failure counted once per log, advice that
knows the stack."""

from __future__ import annotations

import re
import threading
import time

import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import Sandbox
from django_db_tools.webapp.harness import Database, Webapp

from .conftest import APP_PASSWORD, metric_values, run_health


class Load(threading.Thread):
    """``rate`` requests a second to ``path`` until stopped."""

    def __init__(self, app: Webapp, path: str, rate: float):
        super().__init__(daemon=True)
        self.app, self.path, self.period = app, path, 1.0 / rate
        self.stopped = threading.Event()
        self.statuses: list[int] = []

    def run(self) -> None:
        due = time.monotonic()
        while not self.stopped.is_set():
            self.statuses.append(self.app.get(self.path, timeout=10).status)
            due += self.period
            self.stopped.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self.stopped.set()
        self.join()


@pytest.fixture
def log_connections(sandbox: Sandbox):
    sandbox.psql("ALTER SYSTEM SET log_connections = on")
    sandbox.psql("SELECT pg_reload_conf()")
    yield sandbox.postgres.logfile
    sandbox.psql("ALTER SYSTEM RESET log_connections")
    sandbox.psql("SELECT pg_reload_conf()")


def test_churn_is_named_after_a_minute_and_a_burst_that_stays_is_none(
    aggregator, dd_run_check, sandbox, webapps, log_connections
):
    """CONN_MAX_AGE=0 at 10 requests a second beside a deploy of 40 threads that keep their connections,
    the check every 15 s, PostgreSQL's log_connections lines followed."""
    churning = webapps(app_name="churn-web", threads=2, conn_max_age=0)
    burst = webapps(app_name="burst-web", threads=40, conn_max_age=None)
    instance = {
        "postgres": sandbox.postgres.instance("datadog", "datadog-secret"),
        "log_files": [str(log_connections)],
        "thresholds": {"churn_per_minute": {"warning": 100}},
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    started = time.monotonic()
    status, text = run_health(aggregator, dd_run_check, check)
    load = Load(churning, "/query/", rate=10)
    load.start()
    try:
        time.sleep(3)
        replies = burst.drive("/sleep/?seconds=0.5", count=40, concurrency=40)
        assert {r.status for r in replies} == {200}
        for seconds in (15, 30, 45):
            time.sleep(max(0.0, started + seconds - time.monotonic()))
            status, text = run_health(aggregator, dd_run_check, check)
            assert "(churn" not in text  # less than a minute of history: no verdict
        time.sleep(max(0.0, started + 61 - time.monotonic()))
        status, text = run_health(aggregator, dd_run_check, check)
    finally:
        load.stop()
        check.cancel()
    assert set(load.statuses) == {200}
    assert status == AgentCheck.WARNING
    [finding] = [f for f in text.split("; WARNING: ") if "(churn" in f]
    figure = float(finding.removeprefix("WARNING: ").split()[0])
    # about 10 a second for a minute; the 40 burst connections stayed, so they are no churn
    assert 450 <= figure <= 700, finding
    assert "connections a minute opened and closed again (churn, over 6" in finding
    assert ": app=churn-web " in finding and "by the PostgreSQL log" in finding
    share = int(finding.split("app=churn-web ")[1].split("(")[1].split("%")[0])
    assert share >= 90, finding
    assert "burst-web" not in finding
    assert "CONN_MAX_AGE" in finding


@pytest.mark.parametrize(
    "pool, signature, words",
    [
        ("django", "pool_timeout", "couldn't get a connection after 0.5"),
        ("sqlalchemy", "queuepool_limit", "QueuePool limit of size 2 overflow 0 reached"),
    ],
)
def test_a_client_side_pool_that_runs_out_is_named_and_counted(
    aggregator, dd_run_check, sandbox, webapps, pool, signature, words
):
    app = webapps(app_name=f"exhaust-{pool}", threads=6, pool=pool, pool_max_size=2, pool_timeout=0.5)
    instance = {"postgres": sandbox.postgres.instance("datadog", "datadog-secret"), "log_files": [str(app.log_file)]}
    check = DjangoDbCheck("django_db", {}, [instance])
    status, text = run_health(aggregator, dd_run_check, check)
    assert signature not in text
    replies = app.drive("/sleep/?seconds=1.5", count=6, concurrency=6)
    failed = sum(r.status == 500 for r in replies)
    assert failed == 4 and words in app.django_log()
    status, text = run_health(aggregator, dd_run_check, check)
    check.cancel()
    assert status == AgentCheck.CRITICAL
    assert f"CRITICAL: {signature} seen ({failed} from log): Requests got no connection from " in text
    assert "gunicorn --threads" in text and "PostgreSQL has " in text
    counted = metric_values(aggregator, "django_db.errors", f"signature:{signature}", f"log_file:{app.log_file}")
    assert sum(counted) == failed
    # The server sees only the pool's few connections: utilisation alone would have said OK.
    assert "usable slots in use" not in text


def test_query_wait_timeout_counts_once_per_failed_request_in_each_log(aggregator, dd_run_check):
    with Sandbox(max_connections=30, default_pool_size=1, query_wait_timeout=1) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        box.psql("CREATE DATABASE appdb OWNER app")
        box.pgbouncer.users["app"] = APP_PASSWORD
        box.pgbouncer.reload()
        database = Database("127.0.0.1", box.pgbouncer.port, "appdb", "app", APP_PASSWORD)
        with Webapp(database, app_name="qwt-web", threads=6, conn_max_age=None) as app:
            instance = {**box.instance(), "log_files": [str(app.log_file), str(box.pgbouncer.logfile)]}
            check = DjangoDbCheck("django_db", {}, [instance])
            run_health(aggregator, dd_run_check, check)
            replies = app.drive("/sleep/?seconds=2.5", count=12, concurrency=6)
            failed = sum(r.status == 500 for r in replies)
            assert failed >= 5
            assert app.django_log().count("django.db.utils.OperationalError: query_wait_timeout") == failed
            status, text = run_health(aggregator, dd_run_check, check)
            check.cancel()
    assert status == AgentCheck.CRITICAL
    django_log, pgbouncer_log = f"log_file:{app.log_file}", f"log_file:{box.pgbouncer.logfile}"
    errors = {
        log: sum(metric_values(aggregator, "django_db.errors", "signature:query_wait_timeout", log))
        for log in (django_log, pgbouncer_log)
    }
    assert errors == {django_log: failed, pgbouncer_log: failed}
    assert (
        f"CRITICAL: query_wait_timeout seen ({failed} in django.log, {failed} in pgbouncer.log; "
        "a failure can show in each log): " in text
    )
    # PgBouncer's pools are in transaction mode already: the advice does not ask for it
    assert "The pools are in transaction mode already: shorten transactions" in text
    assert "use transaction pool mode" not in text
    assert "appdb/app transaction pool_size 1" in text


def test_churn_is_told_by_who_opens_it_pgbouncers_server_lifetime_and_recycled_workers(aggregator, dd_run_check):
    """Twenty seconds, two churns with CONN_MAX_AGE set: PgBouncer closes its servers after server_lifetime=2 s
    while Django's connections through it persist; gunicorn workers straight to PostgreSQL exit after 3
    requests (--max-requests) with CONN_MAX_AGE=60. Neither is told to set CONN_MAX_AGE."""
    with Sandbox(
        max_connections=60, default_pool_size=8, server_lifetime=2, pg_settings={"log_connections": "on"}
    ) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        box.psql("CREATE DATABASE appdb OWNER app")
        box.pgbouncer.users["app"] = APP_PASSWORD
        box.pgbouncer.reload()
        through = Database("127.0.0.1", box.pgbouncer.port, "appdb", "app", APP_PASSWORD)
        direct = Database("127.0.0.1", box.postgres.port, "appdb", "app", APP_PASSWORD)
        with (
            Webapp(through, app_name="persist-web", threads=4, conn_max_age=None) as persist,
            Webapp(direct, app_name="recycled", workers=2, threads=2, max_requests=3, conn_max_age=60) as recycled,
        ):
            instance = {
                **box.instance(),
                "log_files": [str(box.postgres.logfile), str(box.pgbouncer.logfile)],
                "apps": [
                    {"match": "^persist-web$", "conn_max_age": None},
                    {"match": "^recycled$", "conn_max_age": 60},
                ],
                "thresholds": {"churn_per_minute": {"warning": 30}},
            }
            check = DjangoDbCheck("django_db", {}, [instance])
            check.sessions.window.window = 20.0  # the minute of history is test_churn_is_named_after_a_minute's
            started = time.monotonic()
            run_health(aggregator, dd_run_check, check)
            loads = [Load(persist, "/query/", rate=4), Load(recycled, "/query/", rate=3)]
            for load in loads:
                load.start()
            try:
                for seconds in (10, 21):
                    time.sleep(max(0.0, started + seconds - time.monotonic()))
                    _, text = run_health(aggregator, dd_run_check, check)
            finally:
                for load in loads:
                    load.stop()
                check.cancel()
    assert all(set(load.statuses) == {200} for load in loads)
    [finding] = [f for f in text.split("; WARNING: ") if "(churn" in f]
    total = float(finding.removeprefix("WARNING: ").split()[0])
    named = {who: float(n) for who, n in re.findall(r"(PgBouncer|app=\S+) (\d+) \(\d+%", finding)}
    assert set(named) == {"PgBouncer", "app=recycled"}, finding  # persist-web's clients stay: not its churn
    assert sum(named.values()) <= total + 1, finding  # never more than the churn, whatever the sources
    assert "PgBouncer " in finding and "PgBouncer's log" in finding
    assert "PgBouncer opens them: it closes its server connections after server_lifetime=2 s" in finding
    assert "`closing because: server lifetime over`" in finding and "raise server_lifetime" in finding
    assert "app=recycled's connections lived about " in finding
    assert "far short of its CONN_MAX_AGE=60 s: processes that exit (gunicorn max_requests" in finding
    assert "set CONN_MAX_AGE" not in finding
