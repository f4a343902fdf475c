"""PgBouncer metrics from the SHOW results of each version, read by column name.

1.15, 1.18, 1.24 and 1.26 were recorded from live servers (tests/recorded/record.py: 1.18 is the one
Debian installs here, the others are fetched from Debian's archive by django_db_tools.debian, and run
live in tests/test_pgbouncer_matrix.py too); the other versions, which no machine here can run, hold
the columns those versions send, taken from their source and release notes, with illustrative values.
Each file says which in its `_about`.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from datadog_checks.django_db import config
from datadog_checks.django_db.evaluate.model import Metric
from datadog_checks.django_db.evaluate.pgbouncer import pgbouncer_metrics
from datadog_checks.django_db.records import PgbSnapshot
from datadog_checks.django_db.sources.pgbouncer import Result, parse_version, snapshot_from_results, version_texts

from .conftest import load_recorder

RECORDED = Path(__file__).parent / "recorded"
METADATA = Path(__file__).parent.parent / "metadata.csv"
SHOWS = ("POOLS", "STATS", "DATABASES", "LISTS", "CONFIG", "VERSION")
VERSIONS = ("1.8", "1.12", "1.15", "1.16", "1.18", "1.21", "1.23", "1.24", "1.25", "1.26")
SERVER_TAG = "pgbouncer_server:127.0.0.1:6432"
P = "django_db.pgbouncer."

# What each version's columns allow, written out rather than derived from the check's own tables.
LISTS = {f"{P}lists.{item}" for item in (
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
    "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending",
)}  # fmt: skip
BASE = LISTS | {
    f"{P}pools.cl_active", f"{P}pools.cl_waiting", f"{P}pools.sv_active", f"{P}pools.sv_idle", f"{P}pools.sv_used",
    f"{P}pools.sv_tested", f"{P}pools.sv_login", f"{P}pools.maxwait", f"{P}pools.server_utilization",
    f"{P}databases.pool_size", f"{P}databases.reserve_pool_size", f"{P}databases.max_connections",
    f"{P}databases.current_connections", f"{P}databases.paused", f"{P}databases.disabled",
    f"{P}stats.transactions", f"{P}stats.queries", f"{P}stats.bytes_received", f"{P}stats.bytes_sent",
    f"{P}stats.xact_time", f"{P}stats.query_time", f"{P}stats.wait_time",
    f"{P}max_client_conn", f"{P}clients", f"{P}client_utilization",
}  # fmt: skip
CANCEL = {f"{P}pools.cl_active_cancel_req", f"{P}pools.cl_waiting_cancel_req",
          f"{P}pools.sv_active_cancel", f"{P}pools.sv_being_canceled"}  # fmt: skip
EXPECTED_NAMES = {
    "1.8": BASE, "1.12": BASE, "1.15": BASE, "1.16": BASE,  # 1.16's cl_cancel_req has no metric of its own
    "1.18": BASE | CANCEL, "1.21": BASE | CANCEL, "1.23": BASE | CANCEL, "1.24": BASE | CANCEL, "1.25": BASE | CANCEL,
    "1.26": BASE | CANCEL,
}  # fmt: skip
FULL_VERSION = {
    "1.8": None, "1.12": "1.12.0", "1.15": "1.15.0", "1.16": "1.16.1", "1.18": "1.18.0",
    "1.21": "1.21.0", "1.23": "1.23.1", "1.24": "1.24.1", "1.25": "1.25.0", "1.26": "1.26.1",
}  # fmt: skip
LIVE = ("1.15", "1.18", "1.24", "1.26")  # recorded from live servers; the others cannot run here
SYNTHETIC = tuple(v for v in VERSIONS if v not in LIVE)
FROM_SOURCE = re.compile(
    r"made from: PgBouncer (?P<version>[\d.]+)'s column lists in its admin source \(src/admin\.c, src/stats\.c\) "
    r"and release notes, not a live server \(no PgBouncer (?P=version) runs here\); the values are illustrative"
)


def load(version: str) -> dict[str, dict[str, list]]:
    data = json.loads((RECORDED / f"pgbouncer_{version}.json").read_text())
    return {name: data[name] for name in SHOWS}


def as_results(raw: dict[str, dict[str, list]]) -> dict[str, list[dict[str, Any]]]:
    return {
        name: [dict(zip(table["columns"], row, strict=True)) for row in table["rows"]] for name, table in raw.items()
    }


def settings(*groups: str) -> config.Settings:
    """Every metric group by default, so that each version's every column is checked."""
    extra = list(groups or config.METRIC_GROUPS)
    return config.parse({"pgbouncer": {"host": "127.0.0.1", "port": 6432}, "extra_metrics": extra})


def snapshot(results: dict[str, list[dict[str, Any]]]) -> PgbSnapshot:
    """The source's records from SHOW results given as rows keyed by column name."""
    return snapshot_from_results({name: Result.from_dicts(rows) for name, rows in results.items()})


def run(raw: dict[str, dict[str, list]] | dict[str, list[dict[str, Any]]], zipped: bool = False) -> list[Metric]:
    results = raw if zipped else as_results(raw)  # type: ignore[arg-type]
    return list(pgbouncer_metrics(snapshot(results), settings()))  # type: ignore[arg-type]


def names(metrics: list[Metric]) -> set[str]:
    return {m.name for m in metrics}


def value(metrics: list[Metric], name: str, db: str | None = None) -> float:
    found = [m.value for m in metrics if m.name == name and (db is None or f"pgbouncer_db:{db}" in m.tags)]
    assert len(found) == 1, f"{name} {db}: {found}"
    return found[0]


def drop_column(raw: dict[str, dict[str, list]], show: str, column: str) -> dict[str, dict[str, list]]:
    raw = copy.deepcopy(raw)
    table = raw[show]
    index = table["columns"].index(column)
    table["columns"].pop(index)
    for row in table["rows"]:
        row.pop(index)
    return raw


def column(raw: dict[str, dict[str, list]], show: str, key: str, row_key: str, wanted: str) -> Any:
    rows = as_results(raw)[show]
    (row,) = [r for r in rows if r[row_key] == wanted]
    return row[key]


# -- the recordings themselves ----------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_recording_has_every_show_and_rows_match_columns(version):
    raw = load(version)
    for name in SHOWS:
        assert all(len(row) == len(raw[name]["columns"]) for row in raw[name]["rows"]), name
    dbs = {r["database"] for r in as_results(raw)["POOLS"]}
    assert {"pgbouncer", "appdb", "sized"} <= dbs


def test_columns_differ_by_version_as_pgbouncer_changed_them():
    pools = {v: set(load(v)["POOLS"]["columns"]) for v in VERSIONS}
    databases = {v: set(load(v)["DATABASES"]["columns"]) for v in VERSIONS}
    assert "maxwait_us" in pools["1.8"] and "cl_cancel_req" not in pools["1.8"]
    assert not {"cl_cancel_req", "cl_active_cancel_req"} & pools["1.15"]
    assert "cl_cancel_req" in pools["1.16"] and "cl_active_cancel_req" not in pools["1.16"]
    assert "cl_active_cancel_req" in pools["1.18"] and "cl_cancel_req" not in pools["1.18"]
    assert {"paused", "disabled"} <= databases["1.8"] and "min_pool_size" not in databases["1.8"]
    assert "reserve_pool" in databases["1.23"] and "reserve_pool_size" not in databases["1.23"]
    assert {"reserve_pool_size", "load_balance_hosts", "max_client_connections", "current_client_connections"} <= (
        databases["1.24"]
    )
    assert "reserve_pool" not in databases["1.24"]
    assert databases["1.26"] == databases["1.24"] and "min_pool_size" not in databases["1.15"]
    stats = {v: set(load(v)["STATS"]["columns"]) for v in VERSIONS}
    assert stats["1.15"] == stats["1.18"] and "total_server_assignment_count" in stats["1.24"]
    assert stats["1.26"] - stats["1.24"] == {"total_client_login_count", "avg_client_login_count"}
    assert pools["1.26"] - pools["1.18"] == {"load_balance_hosts"}
    clients = {v: set(json.loads((RECORDED / f"pgbouncer_{v}.json").read_text())["CLIENTS"]["columns"]) for v in LIVE}
    assert "application_name" not in clients["1.15"] and clients["1.18"] - clients["1.15"] == {"application_name"}
    assert clients["1.26"] - clients["1.18"] == {"replication", "prepared_statements", "id"}
    assert load("1.8")["VERSION"]["rows"] == []
    assert all(isinstance(v, str) for row in load("1.8")["STATS"]["rows"] for v in row)


# -- every version ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_exactly_the_metrics_the_columns_allow(version):
    metrics = run(load(version))
    assert names(metrics) == EXPECTED_NAMES[version]


# Sent without `extra_metrics`: who holds the connections, who waits, how near each limit, the load.
DEFAULT = {
    f"{P}pools.cl_active", f"{P}pools.cl_waiting", f"{P}pools.sv_active", f"{P}pools.sv_idle", f"{P}pools.maxwait",
    f"{P}pools.server_utilization", f"{P}databases.max_connections",
    f"{P}stats.transactions", f"{P}stats.wait_time", f"{P}max_client_conn", f"{P}clients", f"{P}client_utilization",
}  # fmt: skip
GROUPS = {
    "pgbouncer_cancel": CANCEL,
    "pgbouncer_server_states": {f"{P}pools.sv_used", f"{P}pools.sv_tested", f"{P}pools.sv_login"},
    "pgbouncer_databases": {
        f"{P}databases.{n}" for n in ("current_connections", "pool_size", "reserve_pool_size", "paused", "disabled")
    },
    "pgbouncer_stats": {
        f"{P}stats.{n}" for n in ("queries", "bytes_received", "bytes_sent", "xact_time", "query_time")
    },
    "pgbouncer_lists": LISTS,
}  # fmt: skip


@pytest.mark.parametrize("version", VERSIONS)
def test_by_default_only_the_essential_metrics(version):
    metrics = list(pgbouncer_metrics(snapshot(as_results(load(version))), config.parse({"pgbouncer": {}})))
    assert names(metrics) == EXPECTED_NAMES[version] & DEFAULT
    # Per pool (each database here has one): at most 10 series, max_connections only where a limit is set.
    per_db = [m for m in metrics if "pgbouncer_db:appdb" in m.tags]
    assert len(per_db) <= 10


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_adds_its_metrics_and_nothing_else(group):
    results = as_results(load("1.25"))
    default = names(pgbouncer_metrics(snapshot(results), config.parse({"pgbouncer": {}})))
    extra = names(pgbouncer_metrics(snapshot(results), settings(group)))
    assert extra - default == GROUPS[group]
    assert set().union(*GROUPS.values()) | DEFAULT == EXPECTED_NAMES["1.25"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_metric_is_in_metadata(version):
    with METADATA.open(newline="") as handle:
        known = {row["metric_name"] for row in csv.DictReader(handle)}
    assert names(run(load(version))) <= known


@pytest.mark.parametrize("version", VERSIONS)
def test_no_metric_for_the_admin_database_and_every_one_on_the_server(version):
    metrics = run(load(version))
    assert metrics
    assert not [m for m in metrics if "pgbouncer_db:pgbouncer" in m.tags]
    assert all(SERVER_TAG in m.tags for m in metrics)
    per_db = {t for m in metrics for t in m.tags if t.startswith("pgbouncer_db:")}
    assert per_db == {"pgbouncer_db:appdb", "pgbouncer_db:sized"}


@pytest.mark.parametrize("version", VERSIONS)
def test_pool_gauges_and_tags(version):
    raw = load(version)
    metrics = run(raw)
    for db in ("appdb", "sized"):
        for name in ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_login"):
            assert value(metrics, f"{P}pools.{name}", db) == column(raw, "POOLS", name, "database", db)
    (cl_active,) = [m for m in metrics if m.name == f"{P}pools.cl_active" and "pgbouncer_db:appdb" in m.tags]
    assert {"user:app", "pool_mode:transaction"} <= set(cl_active.tags)


@pytest.mark.parametrize("version", VERSIONS)
def test_maxwait_adds_microseconds_in_seconds(version):
    raw = load(version)
    metrics = run(raw)
    for db in ("appdb", "sized"):
        expected = column(raw, "POOLS", "maxwait", "database", db) + (
            column(raw, "POOLS", "maxwait_us", "database", db) / 1e6
        )
        assert value(metrics, f"{P}pools.maxwait", db) == pytest.approx(expected)


@pytest.mark.parametrize("version", SYNTHETIC)
def test_maxwait_known_values(version):
    metrics = run(load(version))
    assert value(metrics, f"{P}pools.maxwait", "appdb") == pytest.approx(2.5)
    assert value(metrics, f"{P}pools.maxwait", "sized") == pytest.approx(0.00025)


@pytest.mark.parametrize("version", VERSIONS)
def test_cancel_gauges_only_from_1_18(version):
    raw = load(version)
    metrics = run(raw)
    if version in ("1.8", "1.12", "1.15", "1.16"):
        assert not names(metrics) & CANCEL
    else:
        assert value(metrics, f"{P}pools.cl_active_cancel_req", "appdb") == column(
            raw, "POOLS", "cl_active_cancel_req", "database", "appdb"
        )


@pytest.mark.parametrize("version", VERSIONS)
def test_reserve_pool_size_from_either_column_name(version):
    raw = load(version)
    source = "reserve_pool_size" if version in ("1.24", "1.25", "1.26") else "reserve_pool"
    assert source in raw["DATABASES"]["columns"]
    metrics = run(raw)
    for db in ("appdb", "sized"):
        expected = column(raw, "DATABASES", source, "name", db)
        assert value(metrics, f"{P}databases.reserve_pool_size", db) == expected
    assert value(metrics, f"{P}databases.reserve_pool_size", "sized") == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_database_gauges(version):
    raw = load(version)
    metrics = run(raw)
    for db in ("appdb", "sized"):
        for name in ("pool_size", "current_connections", "paused", "disabled"):
            assert value(metrics, f"{P}databases.{name}", db) == column(raw, "DATABASES", name, "name", db)
        # max_db_connections 0 is no limit: then no series, never a 0 that reads as "no connection allowed".
        limit = column(raw, "DATABASES", "max_connections", "name", db)
        sent = [
            m.value for m in metrics if m.name == f"{P}databases.max_connections" and f"pgbouncer_db:{db}" in m.tags
        ]
        assert sent == ([limit] if limit else [])


@pytest.mark.parametrize("version", SYNTHETIC)
def test_stats_counts_bytes_and_times_in_seconds(version):
    metrics = run(load(version))
    assert all(m.kind == "rate" for m in metrics if m.name.startswith(f"{P}stats."))
    expected = {"transactions": 1000, "queries": 2500, "bytes_received": 123456, "bytes_sent": 654321,
                "xact_time": 3.0, "query_time": 2.5, "wait_time": 0.5}  # fmt: skip
    for name, figure in expected.items():
        assert value(metrics, f"{P}stats.{name}", "appdb") == pytest.approx(figure), name
    assert value(metrics, f"{P}stats.query_time", "sized") == pytest.approx(0.3)


@pytest.mark.parametrize("version", LIVE)
def test_stats_of_live_servers_in_seconds(version):
    raw = load(version)
    metrics = run(raw)
    for db in ("appdb", "sized"):
        assert value(metrics, f"{P}stats.queries", db) == column(raw, "STATS", "total_query_count", "database", db)
        micros = column(raw, "STATS", "total_xact_time", "database", db)
        assert micros > 0
        assert value(metrics, f"{P}stats.xact_time", db) == pytest.approx(micros / 1e6)


def test_stats_queries_from_total_requests_before_1_8():
    raw = load("1.8")
    raw["STATS"] = {
        "columns": ["database", "total_requests", "total_received", "total_sent", "total_query_time",
                    "avg_req", "avg_recv", "avg_sent", "avg_query"],
        "rows": [["appdb", "777", "1000", "2000", "1500000", "3", "4", "5", "6"],
                 ["pgbouncer", "9", "0", "0", "0", "0", "0", "0", "0"]],
    }  # fmt: skip
    metrics = run(raw)
    assert value(metrics, f"{P}stats.queries", "appdb") == 777
    assert value(metrics, f"{P}stats.query_time", "appdb") == pytest.approx(1.5)
    stats = {m.name for m in metrics if m.name.startswith(f"{P}stats.")}
    assert stats == {f"{P}stats.queries", f"{P}stats.bytes_received", f"{P}stats.bytes_sent", f"{P}stats.query_time"}


# -- pool and client utilization -------------------------------------------------------------------


@pytest.mark.parametrize("version", SYNTHETIC)
def test_server_utilization_uses_the_database_pool_size(version):
    metrics = run(load(version))
    # appdb: pool_size -1 before 1.16 (falls back to default_pool_size 25 from CONFIG), 25 after; sized: 8.
    assert value(metrics, f"{P}pools.server_utilization", "appdb") == pytest.approx(10 / 25)
    assert value(metrics, f"{P}pools.server_utilization", "sized") == pytest.approx(5 / 8)


@pytest.mark.parametrize("version", ("1.8", "1.12"))
def test_server_utilization_falls_back_to_default_pool_size_when_minus_one(version):
    raw = load(version)
    assert column(raw, "DATABASES", "pool_size", "name", "appdb") == -1
    raw["CONFIG"]["rows"] = [
        [row[0], "40", *row[2:]] if row[0] == "default_pool_size" else row for row in raw["CONFIG"]["rows"]
    ]
    metrics = run(raw)
    assert value(metrics, f"{P}pools.server_utilization", "appdb") == pytest.approx(10 / 40)
    assert value(metrics, f"{P}pools.server_utilization", "sized") == pytest.approx(5 / 8)


@pytest.mark.parametrize("version", LIVE)
def test_server_utilization_of_live_servers(version):
    raw = load(version)
    metrics = run(raw)
    active = column(raw, "POOLS", "sv_active", "database", "appdb")
    assert active >= 1
    assert value(metrics, f"{P}pools.server_utilization", "appdb") == pytest.approx(active / 20)
    assert value(metrics, f"{P}pools.server_utilization", "sized") == pytest.approx(
        column(raw, "POOLS", "sv_active", "database", "sized") / 7
    )


def test_server_utilization_falls_back_when_the_pool_size_column_is_missing():
    metrics = run(drop_column(load("1.25"), "DATABASES", "pool_size"))
    assert value(metrics, f"{P}pools.server_utilization", "sized") == pytest.approx(5 / 25)
    assert f"{P}databases.pool_size" not in names(metrics)


def test_server_utilization_falls_back_when_the_database_row_is_missing():
    raw = load("1.25")
    raw["DATABASES"]["rows"] = [row for row in raw["DATABASES"]["rows"] if row[0] != "sized"]
    metrics = run(raw)
    assert value(metrics, f"{P}pools.server_utilization", "sized") == pytest.approx(5 / 25)


def test_no_server_utilization_without_any_pool_size():
    raw = drop_column(load("1.25"), "DATABASES", "pool_size")
    raw["CONFIG"]["rows"] = [row for row in raw["CONFIG"]["rows"] if row[0] != "default_pool_size"]
    metrics = run(raw)
    assert f"{P}pools.server_utilization" not in names(metrics)
    assert f"{P}pools.sv_active" in names(metrics)


@pytest.mark.parametrize("version", VERSIONS)
def test_client_utilization_is_used_clients_over_max_client_conn(version):
    raw = load(version)
    metrics = run(raw)
    used = column(raw, "LISTS", "items", "list", "used_clients")
    limit = float(column(raw, "CONFIG", "value", "key", "max_client_conn"))
    assert value(metrics, f"{P}clients") == used
    assert value(metrics, f"{P}max_client_conn") == limit
    assert value(metrics, f"{P}client_utilization") == pytest.approx(used / limit)
    if version not in LIVE:
        assert value(metrics, f"{P}client_utilization") == pytest.approx(20 / 200)


# -- version ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_version_from_show_version(version):
    results = as_results(load(version))
    assert parse_version(version_texts(Result.from_dicts(results["VERSION"]))) == FULL_VERSION[version]
    assert snapshot(results).version == FULL_VERSION[version]


def test_version_from_the_1_8_notice():
    results = as_results(load("1.8"))
    results["VERSION"] = [{"version": "PgBouncer version 1.8.1"}]
    assert snapshot(results).version == "1.8.1"


# -- provenance -------------------------------------------------------------------------------------


def test_every_recording_says_what_it_was_made_from():
    files = sorted(RECORDED.glob("pgbouncer_*.json"))
    assert sorted(f.stem.removeprefix("pgbouncer_") for f in files) == sorted(VERSIONS)
    recorder = load_recorder()
    for path in files:
        version = path.stem.removeprefix("pgbouncer_")
        about = json.loads(path.read_text()).get("_about", "")
        full = FULL_VERSION[version] or "1.8.1"  # 1.8 answers SHOW VERSION with a notice
        if version in LIVE:
            assert about == recorder.about(full), path.name
        else:
            found = FROM_SOURCE.match(about)
            assert found is not None, f"{path.name}: {about!r}"
            assert found["version"] == full, path.name


# -- tolerance of unknown and missing columns ------------------------------------------------------


def test_unknown_columns_and_list_items_are_ignored():
    raw = load("1.25")
    before = run(raw)
    for name in ("POOLS", "STATS", "DATABASES", "CONFIG"):
        raw[name]["columns"].append("column_from_the_future")
        for row in raw[name]["rows"]:
            row.append(42)
    raw["LISTS"]["rows"].append(["items_from_the_future", 5])
    after = run(raw)
    assert sorted(after) == sorted(before)


@pytest.mark.parametrize(
    ("show", "dropped", "lost"),
    [
        ("POOLS", "sv_login", {f"{P}pools.sv_login"}),
        ("POOLS", "cl_active_cancel_req", {f"{P}pools.cl_active_cancel_req"}),
        ("POOLS", "maxwait", {f"{P}pools.maxwait"}),
        ("POOLS", "sv_active", {f"{P}pools.sv_active", f"{P}pools.server_utilization"}),
        ("STATS", "total_wait_time", {f"{P}stats.wait_time"}),
        ("STATS", "total_query_count", {f"{P}stats.queries"}),
        ("DATABASES", "reserve_pool_size", {f"{P}databases.reserve_pool_size"}),
        ("DATABASES", "paused", {f"{P}databases.paused"}),
        ("DATABASES", "current_connections", {f"{P}databases.current_connections"}),
    ],
)
def test_a_missing_column_skips_only_its_metric(show, dropped, lost):
    raw = load("1.25")
    metrics = run(drop_column(raw, show, dropped))
    assert names(metrics) == EXPECTED_NAMES["1.25"] - lost


def test_missing_maxwait_us_keeps_maxwait_in_whole_seconds():
    metrics = run(drop_column(load("1.25"), "POOLS", "maxwait_us"))
    assert value(metrics, f"{P}pools.maxwait", "appdb") == 2


def test_a_missing_show_skips_only_its_metrics():
    results = as_results(load("1.25"))
    del results["STATS"]
    metrics = run(results, zipped=True)
    assert names(metrics) == {n for n in EXPECTED_NAMES["1.25"] if not n.startswith(f"{P}stats.")}
