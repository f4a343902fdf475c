"""PgBouncer's tag values stay bounded, whatever names clients ask for."""

from __future__ import annotations

import psycopg
import pytest

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.pgbouncer import pgbouncer_metrics
from datadog_checks.django_db.evaluate.pgbouncer_fold import fold_pgbouncer
from datadog_checks.django_db.records import PgbConfig, PgbDatabase, PgbPool, PgbSnapshot, PgbStats
from django_db_tools.sandbox import Sandbox

from .conftest import APP_PASSWORD, metric_values

PGB = {"pgbouncer": {"host": "127.0.0.1", "port": 6432, "username": "datadog", "password": "x"}}


def db(name: str, current: float = 0, pool_size: float = -1, max_connections: float = 0) -> PgbDatabase:
    return PgbDatabase(name, None, pool_size, 0, max_connections, current, 0, 0)


def pool(name: str, user: str = "app", cl_active: float = 0, maxwait: float = 0) -> PgbPool:
    return PgbPool(name, user, "transaction", 20, cl_active=cl_active, sv_idle=0, maxwait=maxwait)


def stats(name: str, transactions: float = 0) -> PgbStats:
    return PgbStats(name, transactions, transactions, 0, 0, 0, 0, 0)


def snapshot(pools, databases, stats_rows, **config) -> PgbSnapshot:
    return PgbSnapshot(tuple(pools), tuple(databases), tuple(stats_rows), {}, PgbConfig(**config), "1.18.0")


def tag_values(metrics, dimension: str) -> set[str]:
    return {t.split(":", 1)[1] for m in metrics for t in m.tags if t.startswith(dimension + ":")}


def test_within_the_limit_nothing_changes():
    snap = snapshot([pool("a"), pool("b")], [db("a"), db("b")], [stats("a"), stats("b")])
    assert fold_pgbouncer(snap, 2) == (snap, {})


@pytest.mark.parametrize("order", ["by name, as PgBouncer lists them", "shuffled"])
def test_the_limit_counts_each_name_once_across_pools_databases_and_stats(order):
    # Four names in all: `b` only in the pools, `d` only in the stats rows.
    pools, databases, stats_rows = (
        [pool("a"), pool("a", "web"), pool("b")],
        [db("a"), db("c")],
        [stats("c"), stats("d")],
    )
    if order == "shuffled":
        pools, databases, stats_rows = pools[::-1], databases[::-1], stats_rows[::-1]
    snap = snapshot(pools, databases, stats_rows)
    assert fold_pgbouncer(snap, 4) == (snap, {})
    folded, away = fold_pgbouncer(snap, 3)
    assert away == {"pgbouncer_db": ["d"]}
    assert {s.db for s in folded.stats} == {"c", "other"}


def test_busy_databases_are_kept_and_the_rest_merge_into_other():
    names = [f"probe{i}" for i in range(5)]
    snap = snapshot(
        [pool("shop", cl_active=3), pool("quiet"), *(pool(n, maxwait=i) for i, n in enumerate(names))],
        [db("shop", current=2), db("quiet"), *(db(n, max_connections=10) for n in names)],
        [stats("shop", 100), stats("quiet", 5), *(stats(n) for n in names)],
        default_pool_size=20,
        max_db_connections=None,
    )
    folded, away = fold_pgbouncer(snap, 2)
    # `shop` holds connections; `quiet` holds none but served traffic; the probes neither.
    assert away == {"pgbouncer_db": names}
    assert {p.db for p in folded.pools} == {"shop", "quiet", "other"}
    other_pool = next(p for p in folded.pools if p.db == "other")
    assert other_pool.maxwait == 4 and other_pool.pool_size == 100 and other_pool.cl_active == 0
    other_db = next(d for d in folded.databases if d.name == "other")
    assert other_db.pool_size == 100  # five databases of default_pool_size (their -1)
    assert other_db.max_connections == 50
    assert [s.db for s in folded.stats] == ["shop", "quiet", "other"]
    # Kept rows are the very same.
    assert next(d for d in folded.databases if d.name == "shop") == snap.databases[0]


def test_an_unlimited_database_makes_other_unlimited():
    snap = snapshot([], [db("a", max_connections=5), db("b"), db("c", current=1)], [])
    folded, _ = fold_pgbouncer(snap, 1)
    assert next(d for d in folded.databases if d.name == "other").max_connections == 0


def test_users_are_capped_too():
    snap = snapshot([pool("shop", user=f"u{i}", cl_active=i) for i in range(4)], [db("shop")], [stats("shop")])
    folded, away = fold_pgbouncer(snap, 2)
    assert away == {"user": ["u0", "u1"]}
    assert sorted((p.user, p.cl_active) for p in folded.pools) == [("other", 1), ("u2", 2), ("u3", 3)]


def test_the_metrics_carry_at_most_max_tag_values_per_dimension():
    names = [f"probe{i}" for i in range(80)]
    snap = snapshot(
        [pool("shop", cl_active=1), *(pool(n, user=n) for n in names)],
        [db("shop"), *(db(n) for n in names)],
        [stats("shop", 10), *(stats(n) for n in names)],
    )
    metrics = list(pgbouncer_metrics(snap, parse({**PGB, "max_tag_values": 50})))
    assert len(tag_values(metrics, "pgbouncer_db")) == 51 and "other" in tag_values(metrics, "pgbouncer_db")
    assert len(tag_values(metrics, "user")) == 51
    # One series per metric and tag set: merged rows, not duplicates the Agent would overwrite.
    keys = [(m.name, m.tags) for m in metrics]
    assert len(keys) == len(set(keys))


@pytest.fixture(scope="module")
def probed():
    """A PgBouncer with a `*` entry that 80 clients asked for 80 databases PostgreSQL does not have."""
    with Sandbox(max_connections=30) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        box.psql("CREATE DATABASE appdb OWNER app")
        box.pgbouncer.users["app"] = APP_PASSWORD
        box.pgbouncer.reload()
        port = box.pgbouncer.port
        with psycopg.connect(
            host="127.0.0.1", port=port, user="app", password=APP_PASSWORD, dbname="appdb", prepare_threshold=None
        ) as conn:
            conn.execute("SELECT 1")
        for i in range(80):
            with pytest.raises(psycopg.OperationalError, match="does not exist"):
                psycopg.connect(
                    host="127.0.0.1", port=port, user="app", password=APP_PASSWORD, dbname=f"probe{i}",
                    connect_timeout=5,
                )  # fmt: skip
        yield box


def test_eighty_refused_databases_make_at_most_max_tag_values(aggregator, dd_run_check, probed):
    instance = {
        "pgbouncer": probed.pgbouncer.instance("datadog"),
        "extra_metrics": ["pgbouncer_stats", "pgbouncer_databases"],
    }
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        dd_run_check(check)
    finally:
        check.cancel()
    metrics = [m for name in aggregator.metric_names if name.startswith("django_db.pgbouncer.")
               for m in aggregator.metrics(name)]  # fmt: skip
    values = tag_values(metrics, "pgbouncer_db")
    assert len(values) == 51, sorted(values)
    assert {"appdb", "other"} <= values  # the database that served queries is kept
    assert metric_values(aggregator, "django_db.pgbouncer.stats.queries", "pgbouncer_db:appdb")
    # Every probe has a pool and a stats row, so both fold; PgBouncer lists only some of the probes
    # under SHOW DATABASES (it sets idle ones aside), and those may all be among the names kept.
    for name in ("pools.cl_active", "stats.queries"):
        assert len(metric_values(aggregator, f"django_db.pgbouncer.{name}", "pgbouncer_db:other")) == 1, name
    assert len(metric_values(aggregator, "django_db.pgbouncer.databases.pool_size", "pgbouncer_db:other")) <= 1
