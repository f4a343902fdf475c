"""The client-side view's evaluation, without servers: rates, resets, sums, findings."""

from __future__ import annotations

import pytest

from datadog_checks.django_db.config import Level
from datadog_checks.django_db.evaluate.django_metrics import (
    DjangoHistory,
    django_findings,
    django_metrics,
    failure_text,
    increase,
)
from datadog_checks.django_db.evaluate.model import Status, Subject
from datadog_checks.django_db.records import DjangoAlias, DjangoPool, DjangoScrape, DjangoScrapeFailure

CHURN = Level(100, None)


def scrape(url: str, t: float, opened: float, failed: float = 0.0, app: str = "web", **kw: object) -> DjangoScrape:
    alias = DjangoAlias("default", new_connections=opened, connection_errors=failed, queries=kw.pop("queries", 0.0))
    return DjangoScrape(url=url, app=app, time=t, aliases=(alias,), **kw)  # type: ignore[arg-type]


def values(metrics, name: str, *tags: str) -> list[float]:
    return [m.value for m in metrics if m.name == name and set(tags) <= set(m.tags)]


@pytest.mark.parametrize(
    "before, after, grown",
    [(None, 5.0, 5.0), (3.0, 5.0, 2.0), (10.0, 4.0, 4.0), (4.0, 4.0, 0.0), (4.0, None, 0.0)],
)
def test_increase_never_negative(before, after, grown):
    assert increase(before, after) == grown


def test_first_read_gives_no_rate_then_rates_summed_per_app():
    history = DjangoHistory()
    first = history.update([scrape("a", 0.0, 100), scrape("b", 0.0, 50)])
    assert values(django_metrics(first), "django_db.django.new_connections") == []
    run = history.update([scrape("a", 10.0, 130, queries=40.0), scrape("b", 10.0, 70)])
    metrics = django_metrics(run, ["env:x"])
    # (30 + 20) connections over 10 s, two workers of one app in one series
    assert values(metrics, "django_db.django.new_connections", "app:web", "alias:default", "env:x") == [5.0]
    assert values(metrics, "django_db.django.queries", "app:web") == [4.0]


def test_a_restarted_worker_gives_no_negative_rate():
    history = DjangoHistory()
    history.update([scrape("a", 0.0, 500), scrape("b", 0.0, 500)])
    run = history.update([scrape("a", 10.0, 20), scrape("b", 10.0, 510)])  # a restarted: 20 since
    assert values(django_metrics(run), "django_db.django.new_connections") == [3.0]


def test_errors_by_type_and_pool_gauges():
    history = DjangoHistory()
    pool = DjangoPool("default", size=4, available=1, max_size=4, requests_waiting=2, timeouts=0, connections=4)
    history.update(
        [DjangoScrape("a", "web", 0.0, (DjangoAlias("default", errors=(("IntegrityError", 1.0),)),), (pool,))]
    )
    later = DjangoAlias("default", errors=(("IntegrityError", 3.0), ("OperationalError", 5.0)))
    run = history.update([DjangoScrape("a", "web", 2.0, (later,), (pool,))])
    metrics = django_metrics(run)
    assert values(metrics, "django_db.django.errors", "type:IntegrityError") == [1.0]
    assert values(metrics, "django_db.django.errors", "type:OperationalError") == [2.5]
    assert values(metrics, "django_db.django.pool.requests_waiting", "app:web") == [2.0]
    assert values(metrics, "django_db.django.pool.available", "app:web") == [1.0]
    assert values(metrics, "django_db.django.pool.timeouts", "app:web") == [0.0]


def test_churn_named_by_app_from_a_minute_of_counters():
    history = DjangoHistory()
    history.update([scrape("a", 0.0, 0), scrape("b", 0.0, 0, app="worker")])
    findings = []
    for t in (15.0, 30.0, 45.0, 60.0):
        run = history.update([scrape("a", t, 40 * t / 15), scrape("b", t, t / 15, app="worker")])
        findings = django_findings(run, CHURN)
    churn = {f.subjects: f for f in findings if f.code == "connection_churn"}
    web = churn[(Subject(("app:web",), 160.0),)]
    assert (web.status, web.figure, web.threshold) == (Status.WARNING, 160.0, 100)
    assert "app=web opened 160 new connections a minute" in web.text
    assert "CONN_MAX_AGE" in web.advice
    worker = churn[(Subject(("app:worker",), 4.0),)]
    assert worker.status == Status.OK


def test_a_burst_is_not_stretched_into_a_rate():
    history = DjangoHistory()
    history.update([scrape("a", 0.0, 0)])
    run = history.update([scrape("a", 1.0, 60)])  # 60 in one second, then nothing
    churn = [f for f in django_findings(run, CHURN) if "opened" in f.text]
    assert churn[0].status == Status.OK and "opened 60 new connections" in churn[0].text


def test_old_intervals_leave_the_minute():
    history = DjangoHistory()
    history.update([scrape("a", 0.0, 0)])
    history.update([scrape("a", 10.0, 500)])
    run = history.update([scrape("a", 70.0, 510)])
    assert "opened 10 new connections" in next(f.text for f in django_findings(run, CHURN) if "opened" in f.text)


def test_failed_attempts_are_no_churn():
    history = DjangoHistory()
    history.update([scrape("a", 0.0, 0, 0)])
    run = history.update([scrape("a", 30.0, 200, 170)])  # PgBouncer refused 170 of 200 attempts
    texts = [f.text for f in django_findings(run, CHURN)]
    assert any("app=web opened 30 new connections a minute" in t for t in texts), texts
    assert any("app=web failed to open 170 connections in the last minute (of 200 attempts)" in t for t in texts)


def test_failed_connections_in_the_last_minute():
    history = DjangoHistory()
    history.update([scrape("a", 0.0, 10, 0), scrape("b", 0.0, 10, 0)])
    run = history.update([scrape("a", 15.0, 20, 3), scrape("b", 15.0, 14, 2)])
    (failed,) = [f for f in django_findings(run, CHURN) if f.code == "connection_failures"]
    assert (failed.status, failed.figure, failed.subjects) == (Status.WARNING, 5, (Subject(("app:web",), 5),))
    assert failed.text == "app=web failed to open 5 connections in the last minute (of 14 attempts)"


def test_no_failure_no_finding():
    history = DjangoHistory()
    history.update([scrape("a", 0.0, 10)])
    run = history.update([scrape("a", 15.0, 12)])
    assert not [f for f in django_findings(run, CHURN) if f.status != Status.OK]


def test_with_a_pool_churn_counts_the_pools_connections_not_check_outs():
    history = DjangoHistory()

    def pooled(t: float, checkouts: float, physical: float) -> DjangoScrape:
        pool = DjangoPool("default", size=4, available=4, max_size=4, requests_waiting=0, timeouts=0)
        pool = DjangoPool(**{**pool.__dict__, "connections": physical})
        return scrape("a", t, checkouts, pools=(pool,))

    history.update([pooled(0.0, 0, 4)])
    run = history.update([pooled(60.0, 5000, 4)])
    churn = next(f for f in django_findings(run, CHURN) if "opened" in f.text)
    assert churn.status == Status.OK and "opened 0 new connections" in churn.text
    assert "max_lifetime" in churn.advice


def test_pool_waiting_two_runs_in_a_row_and_timeouts():
    history = DjangoHistory()

    def pooled(t: float, waiting: float, timeouts: float) -> DjangoScrape:
        pool = DjangoPool("default", size=4, available=0, max_size=4, requests_waiting=waiting, timeouts=timeouts)
        return scrape("a", t, 4, failed=timeouts, pools=(pool,))  # django-prometheus counts timeouts as errors

    history.update([pooled(0.0, 0, 0)])
    once = history.update([pooled(15.0, 3, 0)])
    assert not [f for f in django_findings(once, CHURN) if "waiting" in f.text]  # a burst
    twice = history.update([pooled(30.0, 3, 7)])
    found = {f.code: f for f in django_findings(twice, CHURN) if f.status == Status.WARNING}
    assert set(found) == {"pool_requests_waiting", "pool_timeouts"}  # timeouts are no failed connections
    waiting, timeouts = found["pool_requests_waiting"], found["pool_timeouts"]
    assert (waiting.figure, waiting.subjects) == (3, (Subject(("app:web", "alias:default"), 3),))
    assert waiting.text.startswith(
        "app=web has 3 requests waiting for a pool connection (default; 4 open of max_size 4"
    )
    assert (timeouts.figure, timeouts.subjects) == (7, (Subject(("app:web", "alias:default"), 7),))
    assert "app=web got no connection from its pool (default) 7 times in the last minute" in timeouts.text


def test_failures_are_reported_apart_and_say_what_to_do():
    history = DjangoHistory()
    failure = DjangoScrapeFailure("http://10.0.0.7:8001/metrics", "web", "connect_timeout", "timed out")
    run = history.update([failure, scrape("a", 0.0, 1)])
    assert run.failures == [failure] and len(run.scrapes) == 1
    text = failure_text(failure)
    assert text.startswith("Django metrics http://10.0.0.7:8001/metrics (app=web): timed out. The process accepted")
