"""Per-application profiles (`apps`) against real Django applications under gunicorn."""

from __future__ import annotations

import time

import pytest
from datadog_checks.base import AgentCheck, ConfigurationError

from datadog_checks.django_db.config import parse

from .conftest import health, metric_values, one_value, run_new_check, wait_for

PG = {"host": "db", "port": 5432}


def persistent_threads(webapps, sandbox, name: str, threads: int):
    """A web application whose ``threads`` threads each keep a persistent connection (CONN_MAX_AGE=None)."""
    app = webapps(app_name=name, workers=1, threads=threads, conn_max_age=None)
    assert {r.status for r in app.drive("/sleep/?seconds=0.5", count=threads, concurrency=threads)} == {200}
    wait_for(sandbox, name, threads, "idle")
    return app


def test_an_application_over_its_budget_is_named_with_its_count_and_budget(aggregator, dd_run_check, webapps, sandbox):
    persistent_threads(webapps, sandbox, "budget-web", 4)
    instance = {
        "postgres": sandbox.postgres.instance("datadog", "datadog-secret"),
        "apps": [{"match": "^budget-web$", "max_connections": 3}, {"match": "^budget-celery$", "max_connections": 2}],
    }
    status, text = health(aggregator, dd_run_check, instance)
    assert status == AgentCheck.WARNING
    assert "WARNING: app=budget-web holds 4 connections, over its budget of 3" in text
    assert "budget-celery" not in text
    assert one_value(aggregator, "django_db.app.connections", "app:budget-web") == 4
    assert one_value(aggregator, "django_db.app.budget_utilization", "app:budget-web") == pytest.approx(4 / 3)
    # A profile with nothing connected still has its series, at zero.
    assert one_value(aggregator, "django_db.app.connections", "app:budget-celery") == 0

    instance["apps"][0]["max_connections"] = 2
    status, text = health(aggregator, dd_run_check, instance)
    assert status == AgentCheck.CRITICAL
    assert "CRITICAL: app=budget-web holds 4 connections, over its budget of 2" in text

    instance["apps"][0]["max_connections"] = 4
    status, text = health(aggregator, dd_run_check, instance)
    assert "budget-web" not in text


def test_a_pooled_application_idle_within_budget_is_not_leaked(aggregator, dd_run_check, webapps, sandbox):
    app = webapps(app_name="pool-web", threads=2, pool="django", pool_min_size=2, pool_max_size=2)
    assert app.get("/query/").status == 200  # Django opens its pool on the first request
    wait_for(sandbox, "pool-web", 2, "idle")
    time.sleep(1.5)  # past leak_idle_seconds
    base = {
        "postgres": sandbox.postgres.instance("datadog", "datadog-secret"),
        "leak_idle_seconds": 1,
        "applications": {"include": ["^pool-web$"]},  # not the idle connections other tests left behind
    }

    _, text = health(aggregator, dd_run_check, {**base, "apps": [{"match": "^pool-web$", "max_connections": 2}]})
    assert "2 connections of app=pool-web idle for over 1 s (leaked)" in text

    pooled = {**base, "apps": [{"match": "^pool-web$", "max_connections": 2, "pooled": True}]}
    _, text = health(aggregator, dd_run_check, pooled)
    assert "pool-web" not in text
    assert metric_values(aggregator, "django_db.postgres.leaked_connections", "app:pool-web") == []  # 0: not sent

    # Over its budget, its idle connections are leak suspects again, and the budget finding says so.
    over = {**base, "apps": [{"match": "^pool-web$", "max_connections": 1, "pooled": True}]}
    _, text = health(aggregator, dd_run_check, over)
    assert "2 connections of app=pool-web idle for over 1 s (leaked)" in text
    assert "app=pool-web holds 2 connections, over its budget of 1" in text


def test_a_profiles_conn_max_age_sets_its_leak_threshold(aggregator, dd_run_check, webapps, sandbox):
    persistent_threads(webapps, sandbox, "age-web", 2)
    persistent_threads(webapps, sandbox, "age-other", 1)
    time.sleep(1.5)
    instance = {
        "postgres": sandbox.postgres.instance("datadog", "datadog-secret"),
        "leak_idle_seconds": 1,
        "applications": {"include": ["^age-"]},
        "apps": [{"match": "^age-web$", "conn_max_age": 600}],
    }
    _, text = health(aggregator, dd_run_check, instance)
    # age-web keeps connections for 600 s by design: leaked only after 1200 s. age-other has no profile.
    assert "1 connections of app=age-other idle for over 1 s (leaked)" in text
    assert "age-web" not in text


def test_a_profiles_conn_max_age_drives_the_alignment_rules(aggregator, dd_run_check, webapps, sandbox):
    persistent_threads(webapps, sandbox, "align-web", 1)
    instance = {
        **sandbox.instance(),
        "conn_max_age": 60,
        "apps": [{"match": "^align-web$", "conn_max_age": None}, {"match": "^align-beat$", "conn_max_age": 0}],
    }
    sandbox.pgbouncer.settings["client_idle_timeout"] = 600
    try:
        sandbox.pgbouncer.reload()
        run_new_check(aggregator, dd_run_check, instance)
    finally:
        del sandbox.pgbouncer.settings["client_idle_timeout"]
        sandbox.pgbouncer.reload()
    message = aggregator.service_checks("django_db.config_alignment")[0].message
    assert (
        "app=align-web: conn_max_age=None (persistent) is longer than PgBouncer's client_idle_timeout=600 s" in message
    )
    assert "app=align-beat" not in message
    assert not message.startswith("conn_max_age=60 s")


def test_profiles_from_the_configuration():
    settings = parse(
        {
            "postgres": PG,
            "conn_max_age": 30,
            "leak_idle_seconds": 120,
            "apps": [
                {"match": "^web$", "max_connections": 8, "conn_max_age": None},
                {"match": "celery", "name": "worker", "pooled": True},
            ],
        }
    )
    web, worker = settings.apps
    assert (web.name, web.max_connections, web.conn_max_age, web.leak_idle_seconds) == ("web", 8, None, 600)
    assert (worker.name, worker.conn_max_age, worker.leak_idle_seconds, worker.pooled) == ("worker", 30, 120, True)


@pytest.mark.parametrize(
    "apps, key",
    [
        ({"match": "web"}, "`apps`"),
        ([{"max_connections": 3}], "`apps[0].match`"),
        ([{"match": "(web"}], "`apps[0].match`"),
        ([{"match": "web", "max_connections": 0}], "`apps[0].max_connections`"),
        ([{"match": "web", "max_connections": True}], "`apps[0].max_connections`"),
        ([{"match": "web", "conn_max_age": -1}], "`apps[0].conn_max_age`"),
        ([{"match": "web", "pooled": "yes"}], "`apps[0].pooled`"),
        ([{"match": "web", "budget": 3}], "`apps[0]`: unknown option 'budget'"),
        ([{"match": "^web"}, {"match": "web$"}], "`apps[1].name`"),
    ],
)
def test_a_wrong_profile_names_its_key(apps, key):
    with pytest.raises(ConfigurationError, match=key.replace("[", r"\[").replace("]", r"\]").replace("$", r"\$")):
        parse({"postgres": PG, "apps": apps})
