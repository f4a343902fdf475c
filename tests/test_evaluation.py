"""The pure parts: grouping, folding, utilisation, leak rules, sessions and churn. No database."""

from __future__ import annotations

from dataclasses import replace

from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.model import Status, Subject
from datadog_checks.django_db.evaluate.postgres import (
    SessionHistory,
    fold,
    postgres_metrics,
    select,
    state_tag,
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


def utilization(snap):
    """The connection_utilization figure the run sends."""
    metrics, _ = postgres_metrics(snap, parse({"postgres": PG}), {})
    [value] = values(metrics, "django_db.postgres.connection_utilization").values()
    return value


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
    settings = parse({"postgres": PG, "extra_metrics": ["connections_usage"]})
    groups = [
        group(app="web", count=3, leaked=2, max_age=900),
        group(state="idle in transaction", app="web", count=1, max_age=40),
        group(state="active", app="worker", count=1, max_age=12),
    ]
    metrics, _ = postgres_metrics(snapshot(groups), settings, {})
    # zero on a healthy stack: made only where not zero (the 0 that ends a series is sparse.py's)
    assert values(metrics, "django_db.postgres.leaked_connections") == {("db:app", "user:u", "app:web"): 2}
    assert values(metrics, "django_db.postgres.waiting_on_lock") == {}
    assert ("db:app", "app:worker") not in values(metrics, "django_db.postgres.idle.max_age")
    assert values(metrics, "django_db.postgres.idle.max_age")[("db:app", "app:web")] == 900
    assert values(metrics, "django_db.postgres.idle_in_transaction.max_age")[("db:app", "app:web")] == 40
    assert values(metrics, "django_db.postgres.active.max_duration")[("db:app", "app:worker")] == 12
    assert values(metrics, "django_db.connections.usage") == {
        ("state:idle", "db:app", "app:web"): 3,
        ("state:used", "db:app", "app:web"): 1,
        ("state:used", "db:app", "app:worker"): 1,
    }


def test_a_monitoring_session_is_counted_but_has_no_age_figure():
    """Datadog's postgres check and this check's other instances idle between runs and run their own queries:
    their connections count, their ages (the monitor's interval) are no series."""
    groups = [
        group(app="datadog-agent", count=1, max_age=15),
        group(state="active", app="datadog-django-db", count=1, max_age=0.2),
        group(app="web", count=2, max_age=30),
    ]
    metrics, _ = postgres_metrics(snapshot(groups), parse({"postgres": PG}), {})
    connections = values(metrics, "django_db.postgres.connections")
    assert connections[("state:idle", "db:app", "user:u", "app:datadog-agent")] == 1
    assert connections[("state:active", "db:app", "user:u", "app:datadog-django-db")] == 1
    assert values(metrics, "django_db.postgres.idle.max_age") == {("db:app", "app:web"): 30}
    assert values(metrics, "django_db.postgres.active.max_duration") == {}


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


def test_churn_is_what_was_opened_and_did_not_stay_over_a_minute():
    history = SessionHistory()

    def run(time, opened, *groups, **sources):
        snap = snapshot(groups, databases=(DatabaseSessions("app", opened, 0, 0, 0),))
        history.opened_by_db(snap)
        return history.churn(replace(snap, server_time=time), sources)

    assert run(1000.0, 50, group(count=2)) is None
    assert run(1030.0, 90, group(count=42, opened=40)) is None  # a burst; and less than a minute of history
    burst = run(1061.0, 90, group(count=42))
    assert (burst.per_minute, burst.opened, burst.growth, burst.seconds) == (0.0, 40, 40, 61.0)
    # CONN_MAX_AGE=0 under load: 600 opened and closed within the next minute, the log names who
    churn = run(1121.0, 690, group(count=42), log={"web": 540, "beat": 60})
    assert churn.per_minute == 600.0 and churn.seconds == 60.0
    assert churn.by_app == (("web", 540.0, "log"), ("beat", 60.0, "log"))
    assert run(1130.0, 5, group(count=42)) is None  # statistics reset: a new window


def test_churn_by_app_takes_each_application_from_its_best_source_once():
    from datadog_checks.django_db.evaluate.churn import ChurnWindow, Sample

    window = ChurnWindow()
    window.add(Sample(0.0, 0, 10, {"web": 5, "worker": 5}))
    churn = window.add(
        Sample(
            60.0, 300, 30, {"web": 5, "worker": 25},
            {"log": {"web": 200}, "django": {"web": 180, "api": 40}, "sampled": {"worker": 20, "web": 1}},
        )
    )  # fmt: skip
    # web from the log only; api from django; worker's 20 sampled ones stayed (grew by 20): no churn
    assert churn.by_app == (("web", 200.0, "log"), ("api", 40.0, "django"))
    assert churn.per_minute == 280.0  # 300 opened, 20 stayed


def test_pgbouncer_database_limit_falls_back_to_the_global_one_and_0_is_none():
    from datadog_checks.django_db.evaluate.pgbouncer import database_limit

    assert database_limit(5, 20) == 5
    assert database_limit(0, 20) == 20
    assert database_limit(0, 0) is None
    assert database_limit(None, None) is None


def test_the_churn_finding_names_applications_with_their_share():
    from datadog_checks.django_db.evaluate.churn import Churn, churn_finding

    settings = parse({"postgres": PG, "apps": [{"match": "^api$", "pooled": True}]})
    threshold = settings.thresholds.churn_per_minute
    churn = Churn(600.0, 75.0, 750, 0, (("web", 540.0, "log"), ("beat", 60.0, "log")))
    finding = churn_finding(churn, settings, threshold)
    assert (finding.code, finding.status, finding.figure, finding.threshold) == (
        "connection_churn", Status.WARNING, 600.0, 100
    )  # fmt: skip
    assert finding.subjects == (Subject(("app:web",), 540.0), Subject(("app:beat",), 60.0))
    assert finding.line() == (
        "WARNING: 600 connections a minute opened and closed again (churn, over 75 s): app=web 540 (90%), "
        "app=beat 60 (10%), by the PostgreSQL log: their connections do not outlive requests: "
        "set CONN_MAX_AGE (with CONN_HEALTH_CHECKS) or pool"
    )
    mixed = churn_finding(Churn(200.0, 60.0, 200, 0, (("api", 150.0, "django"), ("web", 50.0, "log"))), settings,
                          threshold)  # fmt: skip
    assert "app=api 150 (75%, the processes' counters), app=web 50 (25%, the PostgreSQL log)" in mixed.text
    assert "a pool that replaces its connections" in mixed.advice
    unnamed = churn_finding(Churn(300.0, 60.0, 300, 0), settings, threshold)
    assert unnamed.subjects == ()
    assert unnamed.advice.startswith("no application named; to name them, turn on log_connections")
    assert churn_finding(Churn(3.0, 60.0, 3, 0), settings, threshold).status == Status.OK


def test_postgres_connection_lines_give_the_application():
    from datadog_checks.django_db.evaluate.churn import authorized_apps

    lines = [
        "2026-12-02 17:36:58.761 UTC [11156] LOG:  connection authorized: user=app database=shop application_name=web",
        "2026-12-02 17:36:58.762 UTC [11157] LOG:  connection authorized: user=app database=shop "
        "application_name=celery beat SSL enabled (protocol=TLSv1.3, cipher=TLS_AES_256_GCM_SHA384, bits=256)",
        "2026-12-02 17:36:58.763 UTC [11158] LOG:  connection authorized: user=app database=shop",  # via PgBouncer
        "2026-12-02 17:36:58.764 UTC [11159] LOG:  replication connection authorized: user=rep application_name=w",
        "2026-12-02 17:36:58.765 UTC [11160] LOG:  connection received: host=127.0.0.1 port=5000",
    ]
    assert authorized_apps(lines) == {"web": 1, "celery beat": 1, "": 1}


def test_connections_usage_only_when_asked_for():
    """db.client.connections.usage says it by database; django_db.connections.usage repeats it by app."""
    groups = [group(app="web", count=3), group(state="active", app="web", count=2)]
    metrics, _ = postgres_metrics(snapshot(groups), parse({"postgres": PG}), {})
    assert values(metrics, "django_db.connections.usage") == {}
    assert values(metrics, "db.client.connections.usage") == {
        ("state:idle", "pool.name:db:5432/app"): 3,
        ("state:used", "pool.name:db:5432/app"): 2,
    }
    metrics, _ = postgres_metrics(snapshot(groups), parse({"postgres": PG, "extra_metrics": ["connections_usage"]}), {})
    assert values(metrics, "django_db.connections.usage") == {
        ("state:idle", "db:app", "app:web"): 3,
        ("state:used", "db:app", "app:web"): 2,
    }


def test_backends_on_template_databases_take_a_slot_and_nothing_else():
    snap = PgSnapshot(server(100, 3, 0), (group(count=10),), None, 1000.0, False, template_backends=5)
    assert utilization(snap) == (10 + 5 + 1) / 97
    metrics, _ = postgres_metrics(snap, parse({"postgres": PG}), {})
    assert values(metrics, "django_db.postgres.connections_available") == {(): 97 - 16}


def test_a_providers_sessions_churn_is_named_theirs_not_an_applications():
    from datadog_checks.django_db.evaluate.churn import churn_finding
    from datadog_checks.django_db.records import PROVIDER, PROVIDER_APP
    from datadog_checks.django_db.settings import Level

    history = SessionHistory()

    def run(time, opened, *groups):
        snap = snapshot(groups, databases=(DatabaseSessions("app", opened, 0, 0, 0),))
        history.opened_by_db(snap)
        return history.churn(replace(snap, server_time=time), {})

    run(1000.0, 0, group(app=PROVIDER_APP, count=2, pooler=PROVIDER), group(count=2))
    churn = run(1060.0, 300, group(app=PROVIDER_APP, count=2, pooler=PROVIDER, opened=300), group(count=2))
    finding = churn_finding(churn, parse({"postgres": PG}), Level(100, None))
    assert finding.status == Status.WARNING
    assert "the provider's own sessions 300 (100%)" in finding.text and "app=provider" not in finding.text
    assert finding.subjects == (Subject(("app:provider",), 300.0),)
    assert "CONN_MAX_AGE" not in finding.advice  # no application's setting to change


def test_reserves_of_rds_and_azure():
    rds = replace(server(100, 3, 0), provider_reserved=(("rds.rds_superuser_reserved_connections", 2),))
    assert (rds.reserved_slots, rds.usable_slots) == (5, 95)
    azure = replace(server(100, 3, 0), azure=True)
    assert (azure.reserved_slots, azure.usable_slots) == (15, 85)  # of which the server's 3
    assert replace(azure, superuser_reserved=20).reserved_slots == 20
