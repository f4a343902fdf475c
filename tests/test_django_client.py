"""The client-side view against real Django processes: django-prometheus under gunicorn with two
workers, on the sandbox's PostgreSQL and PgBouncer. The check's figures are compared with the
endpoints' own and with what PostgreSQL counted."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import psycopg
from datadog_checks.base import AgentCheck
from datadog_checks.dev.utils import get_metadata_metrics
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from datadog_checks.django_db import DjangoDbCheck

from .conftest import metric_values

CAN_SCRAPE = "django_db.django.can_scrape"
OTEL = ["db.client.connections.usage"]
NEW = "django_db_new_connections_total"
FAILED = "django_db_new_connection_errors_total"


def endpoint_total(urls: list[str], sample: str) -> float:
    """A counter summed over the endpoints, read as a Prometheus server would."""
    total = 0.0
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - loopback only
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            total += sum(s.value for s in family.samples if s.name == sample)
    return total


def sessions(sandbox, dbname: str = "appdb") -> int:
    """pg_stat_database.sessions: every session PostgreSQL started on the database."""
    with psycopg.connect(sandbox.postgres.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [dbname]).fetchone()[0])


def settled_sessions(sandbox, expected: int, timeout: float = 10) -> int:
    """Ended sessions reach pg_stat_database when their backend exits; wait for that, then read."""
    deadline = time.monotonic() + timeout
    while (count := sessions(sandbox)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def health_message(aggregator) -> str:
    [health] = aggregator.service_checks("django_db.connection_health")
    print(f"\n[{health.status}] {health.message}")  # shown with -s: what an operator reads
    return health.message or ""


def run_between(dd_run_check, check, action) -> tuple[float, float]:
    """Run the check, do ``action``, run it again. Returns the least and the most time between the
    two runs' reads, to bound the rates the second run reports."""
    outer = time.monotonic()
    dd_run_check(check)
    inner = time.monotonic()
    action()
    inner = time.monotonic() - inner
    dd_run_check(check)
    return inner, time.monotonic() - outer


def test_churn_named_from_two_workers_own_counters_matches_postgres(
    aggregator, dd_run_check, pg_instance, webapps, sandbox
):
    """CONN_MAX_AGE=0, each gunicorn worker on its own port (PROMETHEUS_METRICS_EXPORT_PORT_RANGE)."""
    app = webapps(app_name="shop-web", workers=2, threads=2, conn_max_age=0, prometheus=True, prometheus_ports=2)
    urls = app.metrics_urls
    instance = {
        **pg_instance,
        "django_metrics": [{"url": url, "app": "shop-web", "timeout": 3} for url in urls],
        "thresholds": {"churn_per_minute": {"warning": 30}},
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    figures: dict[str, float] = {}

    def load() -> None:
        counted, opened = endpoint_total(urls, NEW), sessions(sandbox)
        executed = endpoint_total(urls, "django_db_execute_total")
        replies = app.drive("/query/", count=60, concurrency=4)
        assert {r.status for r in replies} == {200}
        figures["workers"] = len({r.body.rpartition('"worker_pid": ')[2] for r in replies})
        figures["endpoints"] = endpoint_total(urls, NEW) - counted
        figures["postgres"] = settled_sessions(sandbox, opened + 60) - opened
        figures["queries"] = endpoint_total(urls, "django_db_execute_total") - executed
        aggregator.reset()

    least, most = run_between(dd_run_check, check, load)
    check.cancel()
    print(f"\nendpoints: {figures}; pg_stat_database.sessions grew by {figures['postgres']:g}")
    queries = figures.pop("queries")
    assert figures == {"workers": 2, "endpoints": 60, "postgres": 60}
    assert queries >= 60

    for url in urls:
        tags = [f"django_endpoint:{url}", "app:shop-web", "env_name:test"]
        aggregator.assert_service_check(CAN_SCRAPE, AgentCheck.OK, tags=tags)
    [rate] = metric_values(aggregator, "django_db.django.new_connections", "app:shop-web", "alias:default")
    assert 60 / most <= rate <= 60 / least, (rate, least, most)
    assert metric_values(aggregator, "django_db.django.connection_errors", "app:shop-web") == [0]
    [rate] = metric_values(aggregator, "django_db.django.queries", "app:shop-web")
    assert queries / most <= rate <= queries / least, (rate, queries, least, most)
    message = health_message(aggregator)
    assert "app=shop-web opened 60 new connections a minute, by its processes' own counters" in message
    aggregator.assert_service_check("django_db.connection_health", AgentCheck.WARNING)


def test_failed_connections_through_pgbouncer_one_multiprocess_page(aggregator, dd_run_check, sandbox, webapps):
    """A wrong password at PgBouncer: the attempts never reach PostgreSQL, only the processes see them.
    Two workers in prometheus_client's multiprocess mode, behind one URL."""
    app = webapps(
        through="pgbouncer", app_name="shop-bad", workers=2, threads=2, prometheus=True, prometheus_multiprocess=True,
        env={"WEBAPP_DB_PASSWORD": "not-the-password"},
    )  # fmt: skip
    [url] = app.metrics_urls
    instance = {**sandbox.instance(), "django_metrics": [{"url": url, "app": "shop-bad"}], "tags": ["env_name:test"]}
    check = DjangoDbCheck("django_db", {}, [instance])
    figures: dict[str, float] = {}

    def load() -> None:
        failed, opened = endpoint_total([url], FAILED), sessions(sandbox)
        replies = app.drive("/query/", count=12, concurrency=4)
        figures["errors_served"] = sum(r.status == 500 for r in replies)
        figures["workers_counted"] = len(endpoint_pids(app))
        figures["endpoint"] = endpoint_total([url], FAILED) - failed
        figures["postgres"] = sessions(sandbox) - opened
        aggregator.reset()

    least, most = run_between(dd_run_check, check, load)
    check.cancel()
    assert figures == {"errors_served": 12, "workers_counted": 2, "endpoint": 12, "postgres": 0}, figures
    rates = metric_values(aggregator, "django_db.django.connection_errors", "app:shop-bad", "alias:default")
    # A rate needs both runs' reads of the page: where one failed, the application's own log says why.
    assert len(rates) == 1, f"{rates}; the application's log:\n{app.django_log()[-3000:]}\n{app.output()}"
    [rate] = rates
    assert 12 / most <= rate <= 12 / least
    [by_type] = metric_values(aggregator, "django_db.django.errors", "app:shop-bad", "type:OperationalError") or [0]
    assert by_type == 0  # connection failures are not query errors: django_db_errors_total counts cursors only
    message = health_message(aggregator)
    assert "app=shop-bad failed to open 12 connections in the last minute (of 12 attempts)" in message
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.OK)


def test_a_multiprocess_page_is_read_again_past_a_starting_worker_and_a_file_left_empty_is_critical(
    aggregator, dd_run_check, pg_instance, webapps
):
    """prometheus_client's multiprocess page answers HTTP 500 while a starting worker's file exists and is not yet
    sized (prometheus/client_python#1199): each gunicorn worker started on max_requests, after a kill or a deploy
    opens that instant. Read again a moment later, the page is whole and nothing failed. A file left empty for good
    (its worker killed in that instant) fails every read: CRITICAL, counted once, with what to do."""
    app = webapps(app_name="shop-mp", workers=2, threads=2, prometheus=True, prometheus_multiprocess=True)
    [url] = app.metrics_urls
    folder = app.folder / "prometheus"
    deadline = time.monotonic() + 20
    while len(endpoint_pids(app)) < 2 and time.monotonic() < deadline:  # both workers started: their files sized
        app.drive("/health/", count=4, concurrency=2)
    assert len(endpoint_pids(app)) == 2
    check = DjangoDbCheck("django_db", {}, [{**pg_instance, "django_metrics": [{"url": url, "app": "shop-mp"}]}])
    failed_reads = app.django_log().count("struct.error")

    # A worker starting: its file created, empty; sized as the worker goes on, once the page has failed on it.
    starting = folder / "counter_4194301.db"
    starting.touch()
    sized = threading.Event()

    def worker_goes_on() -> None:
        give_up = time.monotonic() + 30
        while not sized.is_set() and time.monotonic() < give_up:
            if app.django_log().count("struct.error") > failed_reads:
                MmapedDict(str(starting)).close()  # what the worker's own MmapedDict does next
                sized.set()
            time.sleep(0.005)

    thread = threading.Thread(target=worker_goes_on, daemon=True)
    thread.start()
    dd_run_check(check)
    thread.join(10)
    assert sized.is_set(), "the page never failed on the empty file"
    aggregator.assert_service_check(CAN_SCRAPE, AgentCheck.OK, count=1)
    assert not metric_values(aggregator, "django_db.errors", "source:django")

    # A file left empty for good: the page fails on every read, and so does the read made again.
    starting.unlink()
    (folder / "counter_4194302.db").touch()
    aggregator.reset()
    dd_run_check(check)
    [sc] = aggregator.service_checks(CAN_SCRAPE)
    assert sc.status == AgentCheck.CRITICAL
    assert "HTTP 500 Internal Server Error, and again 0.2 s later" in sc.message, sc.message
    assert "a file of 0 bytes in PROMETHEUS_MULTIPROC_DIR" in sc.message and "check the URL's path" not in sc.message
    assert metric_values(aggregator, "django_db.errors", "source:django", "signature:http_status") == [1]

    (folder / "counter_4194302.db").unlink()
    aggregator.reset()
    dd_run_check(check)
    check.cancel()
    aggregator.assert_service_check(CAN_SCRAPE, AgentCheck.OK, count=1)


def endpoint_pids(app) -> set[str]:
    """The worker processes whose files prometheus_client's multiprocess mode merges."""
    folder = app.folder / "prometheus"
    return {path.stem.rpartition("_")[2] for path in folder.glob("counter_*.db")}


def test_django_pool_gauges_timeouts_and_no_false_churn(aggregator, dd_run_check, pg_instance, sandbox, webapps):
    """Django 5.1's pool, exposed per worker with the collector docs/django-metrics.md shows: django-prometheus counts
    check-outs, so churn must come from the pool's own count of connections, as PostgreSQL sees it."""
    app = webapps(
        app_name="shop-pool", workers=2, threads=4, pool="django", pool_min_size=1, pool_max_size=2, pool_timeout=1,
        prometheus=True, prometheus_ports=2,
    )  # fmt: skip
    urls = app.metrics_urls
    instance = {
        **pg_instance,
        "django_metrics": [{"url": url, "app": "shop-pool"} for url in urls],
        "thresholds": {"churn_per_minute": {"warning": 30}},
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    figures: dict[str, float] = {}

    def load() -> None:
        app.drive("/query/", count=60, concurrency=4)  # check-outs, not connections
        replies = app.drive("/sleep/?seconds=1.5", count=16, concurrency=16)
        figures["refused"] = sum(r.status == 500 for r in replies)
        figures["query_errors"] = sum(r.status == 500 for r in app.drive("/error/", count=3))
        figures["timeouts"] = endpoint_total(urls, "django_db_pool_timeouts_total")
        figures["check_outs"] = endpoint_total(urls, NEW)
        aggregator.reset()

    least, most = run_between(dd_run_check, check, load)
    with psycopg.connect(sandbox.postgres.dsn(), autocommit=True) as conn:
        held = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shop-pool'").fetchone()[0]
    check.cancel()
    print(f"\n{figures}; PostgreSQL holds {held} connections of shop-pool")
    assert figures["refused"] >= 1 and figures["timeouts"] == figures["refused"], figures
    assert figures["check_outs"] >= 60 + 16 - figures["refused"]
    assert held <= 4 and figures["query_errors"] == 3  # two workers, max_size 2
    assert metric_values(aggregator, "django_db.django.pool.max_size", "app:shop-pool") == [4]
    [size] = metric_values(aggregator, "django_db.django.pool.size", "app:shop-pool")
    assert size == held, (size, held)
    message = health_message(aggregator)
    assert f"app=shop-pool got no connection from its pool (default) {figures['refused']:.0f} times" in message
    assert "app=shop-pool failed to open" not in message  # a pool's timeouts are no failed connection
    # check-outs are no churn: the pool's own connections are, as many as PostgreSQL holds
    assert sum(g.opened for i in check.django_history.recent for g in i.growth.values()) == held
    assert "app=shop-pool opened" not in message
    # the driver's exception class, as django-prometheus names it: psycopg's UndefinedTable
    [errors] = metric_values(aggregator, "django_db.django.errors", "app:shop-pool", "type:UndefinedTable")
    assert 3 / most <= errors <= 3 / least
    [timeouts] = metric_values(aggregator, "django_db.django.pool.timeouts", "app:shop-pool")
    assert figures["refused"] / most <= timeouts <= figures["refused"] / least
    # every django_db.django. metric has its metadata.csv row, and every row was submitted here
    aggregator.assert_metrics_using_metadata(get_metadata_metrics(), exclude=OTEL)
    submitted = {name for name in aggregator.metric_names if name.startswith("django_db.django.")}
    assert {m for m in get_metadata_metrics() if m.startswith("django_db.django.")} == submitted


def test_the_docs_show_the_pool_collector_the_tests_run():
    root = Path(__file__).parent.parent
    code = (root / "django_db_tools/webapp/pool_metrics.py").read_text().split('"""', 2)[2].strip()
    assert f"```python\n{code}\n```" in (root / "docs" / "django-metrics.md").read_text()
