"""OpenTelemetry's current pool metrics without a server: the option, PgBouncer's log, folded pools, MySQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from datadog_checks.base import ConfigurationError

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.mysql import mysql_metrics
from datadog_checks.django_db.evaluate.otel import Pool, pgbouncer_pools, pool_metrics, query_wait_timeouts
from datadog_checks.django_db.records import (
    MysqlSnapshot,
    MysqlStatus,
    MysqlVariables,
    PgbConfig,
    PgbDatabase,
    PgbPool,
    PgbSnapshot,
    ProcessGroup,
)

PG = {"host": "db", "port": 5432}


def test_the_option_defaults_to_legacy_and_refuses_other_names():
    settings = parse({"postgres": PG})
    assert settings.otel_semconv == "legacy" and settings.otel_legacy and not settings.otel_current
    both = parse({"postgres": PG, "otel_semconv": "both"})
    assert both.otel_legacy and both.otel_current
    current = parse({"postgres": PG, "otel_semconv": "current"})
    assert current.otel_current and not current.otel_legacy
    off = parse({"postgres": PG, "otel_semconv": "both", "emit_otel_metrics": False})
    assert not off.otel_legacy and not off.otel_current
    with pytest.raises(ConfigurationError) as error:
        DjangoDbCheck("django_db", {}, [{"postgres": PG, "otel_semconv": "1.26"}])
    assert str(error.value) == "`otel_semconv`: must be one of legacy, current, both (got '1.26')"
    with pytest.raises(ConfigurationError, match=r"^`otel_semconv`: must be a string"):
        DjangoDbCheck("django_db", {}, [{"postgres": PG, "otel_semconv": True}])


def test_query_wait_timeouts_are_counted_by_the_pool_pgbouncer_names():
    lines = [
        "2026-12-02 17:37:00.782 UTC [11157] LOG C-0x5: appdb/app@127.0.0.1:40126 closing because: "
        "query_wait_timeout (age=1s)",
        "2026-12-02 17:37:00.782 UTC [11157] WARNING C-0x5: appdb/app@127.0.0.1:40126 pooler error: query_wait_timeout",
        "2026-12-02 17:37:00.790 UTC [11157] WARNING C-0x6: appdb/app@127.0.0.1:40132 pooler error: query_wait_timeout",
        "2026-12-02 17:37:01.001 UTC [11157] ERROR C-0x7: shop/web@unix(4242):6432 pooler error: query_wait_timeout",
        "2026-12-02 17:37:01.500 UTC [11157] WARNING C-0x8: appdb/app@127.0.0.1:40140 pooler error: "
        "no more connections allowed (max_client_conn)",
        "django.db.utils.OperationalError: query_wait_timeout",  # the application's side of one of them
    ]
    assert query_wait_timeouts(lines) == {"appdb/app": 2, "shop/web": 1}


def _pgb(pools, databases, **config) -> PgbSnapshot:
    return PgbSnapshot(tuple(pools), tuple(databases), (), {}, PgbConfig(**config), "1.18.0")


def _database(name: str, pool_size: float, reserve: float | None, min_pool_size: float | None = None) -> PgbDatabase:
    return PgbDatabase(name, None, pool_size, reserve, 0, 0, 0, 0, min_pool_size)


def test_pgbouncer_pools_from_show_pools_databases_and_config():
    pools = [
        PgbPool("appdb", "app", "transaction", 5, cl_waiting=2, sv_active=3, sv_tested=1, sv_login=1, sv_idle=0),
        PgbPool("shop", "web", "session", 3, sv_active=1, sv_being_canceled=1, sv_idle=1, sv_used=1),
        PgbPool("bare", "web", "transaction", None, sv_idle=2),  # no pool size known (an old version)
    ]
    databases = [_database("appdb", 5, -1, -1), _database("shop", 3, 1, 5)]
    found = pgbouncer_pools(_pgb(pools, databases, reserve_pool_size=2, min_pool_size=1), "pgb:6432", 50)
    assert found == [
        # used: a client holds it, or it is being reset, checked or logged in; idle: sv_idle and sv_used
        Pool("pgb:6432/appdb/app", used=5, idle=0, max=5 + 2, idle_min=1, pending=2),
        Pool("pgb:6432/shop/web", used=2, idle=2, max=3 + 1, idle_min=3, pending=0),  # min_pool_size capped
        Pool("pgb:6432/bare/web", used=0, idle=2, max=None, idle_min=0, pending=0),
    ]
    metrics = list(pool_metrics(found[2:], ("pgbouncer_server:pgb:6432",)))
    # no max without a pool size; no idle.min without a minimum; no timeouts in a run that saw none
    assert [(m.name, m.value) for m in metrics] == [
        ("db.client.connection.count", 0),
        ("db.client.connection.count", 2),
        ("db.client.connection.pending_requests", 0),
    ]
    assert metrics[0].tags == (
        "pgbouncer_server:pgb:6432",
        "db.client.connection.pool.name:pgb:6432/bare/web",
        "db.client.connection.state:used",
    )


def test_folded_pgbouncer_pools_add_up_under_other_with_their_timeouts():
    pools = [
        PgbPool("big", "app", "transaction", 10, cl_waiting=4, sv_active=10),
        PgbPool("small1", "app", "transaction", 2, cl_waiting=1, sv_active=2),
        PgbPool("small2", "app", "session", 3, sv_idle=1),
    ]
    databases = [_database("big", 10, 0), _database("small1", 2, 1), _database("small2", 3, 0)]
    timeouts = {"big/app": 2, "small1/app": 3, "small2/app": 1, "gone/app": 7}
    found = pgbouncer_pools(_pgb(pools, databases), "pgb:6432", 1, timeouts)
    assert found == [
        Pool("pgb:6432/big/app", used=10, idle=0, max=10, idle_min=0, pending=4, timeouts=2),
        # two pool modes, one name: one pool
        Pool("pgb:6432/other/app", used=2, idle=1, max=2 + 1 + 3, idle_min=0, pending=1, timeouts=4),
    ]
    counts = [m for m in pool_metrics(found, ()) if m.name == "db.client.connection.timeouts"]
    assert [(m.kind, m.value) for m in counts] == [("count", 2), ("count", 4)]


def test_mysql_sends_the_current_names_as_one_pool_of_the_server_with_its_limit_once():
    """Two databases: one pool of the whole server, its connections adding up, its max_connections sent once
    (not once per database, which summed to twice the server's slots)."""
    snapshot = MysqlSnapshot(
        MysqlVariables("10.11.6-MariaDB", 151, 28800, 28800),
        MysqlStatus(1000, 7, 2, 40, 3, 4, 50),
        (
            ProcessGroup("idle", "app", "appdb", "10.0.0.7", 2),
            ProcessGroup("idle", "app", "otherdb", "10.0.0.7", 1),
            ProcessGroup("active", "app", "appdb", "10.0.0.7", 2),
            ProcessGroup("idle_in_transaction", "app", "otherdb", "10.0.0.8", 1),
        ),
        new_connection=False,
    )
    mysql = {"mysql": {"host": "db.internal", "port": 3306}}
    legacy, _ = mysql_metrics(snapshot, parse(mysql))
    both, _ = mysql_metrics(snapshot, parse({**mysql, "otel_semconv": "both"}))
    current, _ = mysql_metrics(snapshot, parse({**mysql, "otel_semconv": "current"}))
    new = [m for m in both if m.name.startswith("db.client.connection.")]
    assert [m for m in both if m not in new] == legacy
    assert current == [m for m in both if m.name != "db.client.connections.usage"]
    pool = "db.client.connection.pool.name:db.internal:3306"
    assert all(pool in m.tags for m in new)
    assert len([m for m in new if m.name == "db.client.connection.max"]) == 1
    assert {(m.name, m.value, m.tags[-1]) for m in new} == {
        ("db.client.connection.count", 3, "db.client.connection.state:used"),
        ("db.client.connection.count", 3, "db.client.connection.state:idle"),
        ("db.client.connection.max", 151, pool),
    }


def test_the_docs_give_each_current_name_the_type_it_is_sent_as_and_a_unit():
    sent = {m.name: m.kind for m in pool_metrics([Pool("p", 1, 1, 3, 1, 1, 1)], ())}
    readme = (Path(__file__).parent.parent / "docs" / "opentelemetry.md").read_text()
    rows = dict(re.findall(r"^\| `(db\.client\.connection\.[\w.]+)` \| (\w+), \w+ \|", readme, re.MULTILINE))
    assert rows == sent and len(sent) == 5
