"""The pure parts: grouping, folding, utilisation, leak rules, sessions and churn. No database."""

from __future__ import annotations

from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.postgres import (
    SessionHistory,
    fold,
    postgres_metrics,
    select,
    state_tag,
    utilization,
)
from datadog_checks.django_db.records import ActivityGroup, DatabaseSessions, PgSnapshot, ServerSettings

PG = {"host": "db", "port": 5432}


def server(max_connections=100, superuser=3, reserved=0, version=150000):
    return ServerSettings(version, "15.0", max_connections, superuser, reserved, 0, 0)


def group(state="idle", db="app", user="u", app="web", count=1, **kw):
    return ActivityGroup(state, db, user, app, "", count, **kw)


def snapshot(groups, settings=None, databases=None):
    return PgSnapshot(settings or server(), tuple(groups), databases, 1000.0, False)


def values(metrics, name):
    return {
        tuple(t for t in m.tags if not t.startswith("postgres_server:")): m.value for m in metrics if m.name == name
    }


def test_state_names_become_tags():
    assert state_tag("idle in transaction") == "idle_in_transaction"
    assert state_tag("idle in transaction (aborted)") == "idle_in_transaction_aborted"
    assert state_tag("fastpath function call") == "fastpath_function_call"
    assert state_tag(None) == "unknown"
    assert state_tag("some new state") == "some_new_state"


def test_usable_slots_leave_out_reserved_ones():
    assert server(100, 3, 0).usable_slots == 97
    assert server(100, 3, 5, version=160000).usable_slots == 92  # reserved_connections, PostgreSQL 16
    # The check's own connection takes a slot: 96 others plus it fill 97.
    assert utilization(snapshot([group(count=96)])) == 1.0
    assert utilization(snapshot([group(count=49)], server(100, 3, 47))) == 1.0


def test_fold_keeps_the_largest_values():
    groups = [group(app="a", count=5), group(app="b", count=1), group(app="c", count=3), group(app="d", count=1)]
    folded_groups, folded = fold(groups, ("app",), 2)
    assert sorted({g.app for g in folded_groups}) == ["a", "c", "other"]
    assert folded == {"app": ["b", "d"]}
    assert sum(g.count for g in folded_groups if g.app == "other") == 2


def test_fold_leaves_small_dimensions_alone():
    groups = [group(app="a"), group(app="b")]
    assert fold(groups, ("app", "db"), 2) == (groups, {})


def test_folded_groups_are_summed_into_one_series():
    settings = parse({"postgres": PG, "max_tag_values": 1, "group_by": ["app"]})
    groups = [group(app="a", count=5), group(app="b", count=2), group(app="c", count=1)]
    metrics, folded = postgres_metrics(snapshot(groups), settings, {})
    assert values(metrics, "django_db.postgres.connections") == {
        ("state:idle", "app:a"): 5,
        ("state:idle", "app:other"): 3,
    }
    assert folded == {"app": ["b", "c"]}


def test_filters_pick_groups_but_not_server_figures():
    settings = parse({"postgres": PG, "applications": {"exclude": ["^celery"]}, "databases": {"include": ["^app$"]}})
    groups = [group(app="web", count=2), group(app="celery", count=7), group(db="other", count=4)]
    assert [(g.app, g.db) for g in select(groups, settings)] == [("web", "app")]
    metrics, _ = postgres_metrics(snapshot(groups), settings, {})
    assert values(metrics, "django_db.postgres.connections") == {("state:idle", "db:app", "user:u", "app:web"): 2}
    assert values(metrics, "django_db.postgres.connections_available") == {(): 97 - 14}


def test_leaks_and_ages_per_application():
    settings = parse({"postgres": PG})
    groups = [
        group(app="web", count=3, leaked=2, max_age=900),
        group(state="idle in transaction", app="web", count=1, max_age=40),
        group(state="active", app="worker", count=1, max_age=12),
    ]
    metrics, _ = postgres_metrics(snapshot(groups), settings, {})
    assert values(metrics, "django_db.postgres.leaked_connections") == {
        ("db:app", "user:u", "app:web"): 2,
        ("db:app", "user:u", "app:worker"): 0,
    }
    assert values(metrics, "django_db.postgres.idle.max_age")[("db:app", "app:web")] == 900
    assert values(metrics, "django_db.postgres.idle_in_transaction.max_age")[("db:app", "app:web")] == 40
    assert values(metrics, "django_db.postgres.active.max_duration")[("db:app", "app:worker")] == 12
    assert values(metrics, "django_db.connections.usage") == {
        ("state:idle", "db:app", "app:web"): 3,
        ("state:used", "db:app", "app:web"): 1,
        ("state:used", "db:app", "app:worker"): 1,
    }


def test_empty_names_become_none_and_otel_can_be_turned_off():
    groups = [group(app="", count=2)]
    metrics, _ = postgres_metrics(snapshot(groups), parse({"postgres": PG}), {})
    assert ("state:idle", "db:app", "user:u", "app:none") in values(metrics, "django_db.postgres.connections")
    assert values(metrics, "db.client.connections.usage") == {("state:idle", "pool.name:db:5432/app"): 2}
    metrics, _ = postgres_metrics(snapshot(groups), parse({"postgres": PG, "emit_otel_metrics": False}), {})
    assert values(metrics, "db.client.connections.usage") == {}


def test_sessions_opened_before_postgres_14_accumulate_new_backends():
    history = SessionHistory()
    old = server(version=130000)
    assert history.opened_by_db(snapshot([group(opened=0)], old)) == {"app": 0}
    assert history.opened_by_db(snapshot([group(opened=3), group(db="b", opened=1)], old)) == {"app": 3, "b": 1}
    assert history.opened_by_db(snapshot([group(opened=2)], old)) == {"app": 5, "b": 1}


def test_sessions_from_pg_stat_database_from_14():
    history = SessionHistory()
    snap = snapshot([group(opened=9)], databases=(DatabaseSessions("app", 40, 1, 2, 3),))
    assert history.opened_by_db(snap) == {"app": 40}
    metrics, _ = postgres_metrics(snap, parse({"postgres": PG}), {"app": 40})
    assert values(metrics, "django_db.postgres.sessions.killed") == {("db:app",): 3}
    assert {m.kind for m in metrics if "sessions" in m.name} == {"monotonic_count"}


def test_churn_per_minute():
    history = SessionHistory()
    assert history.churn_per_minute(1000.0, 50) is None
    assert history.churn_per_minute(1030.0, 110) == 120.0
    assert history.churn_per_minute(1060.0, 5) is None  # statistics reset


def test_pgbouncer_database_limit_falls_back_to_the_global_one_and_0_is_none():
    from datadog_checks.django_db.evaluate.pgbouncer import database_limit

    assert database_limit(5, 20) == 5
    assert database_limit(0, 20) == 20
    assert database_limit(0, 0) is None
    assert database_limit(None, None) is None
