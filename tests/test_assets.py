"""The dashboard and the monitors, read as Datadog reads them.

Each file is deserialised with Datadog's API client models, type-checked, and must fit them whole: no
field the models do not know, no part they cannot parse. Every metric, tag key, service check and
template variable their queries use must then be in metadata.csv or service_checks.json and be
submitted, with that tag key, by the check in a real run against the sandbox.
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import pymysql
import pytest
from datadog_api_client import ApiClient, Configuration
from datadog_api_client.model_utils import ModelComposed, ModelNormal, UnparsedObject
from datadog_api_client.v1.model.dashboard import Dashboard
from datadog_api_client.v1.model.monitor import Monitor

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.evaluate import otel
from django_db_tools.mariadb import MariaDB
from django_db_tools.sandbox import Sandbox
from django_db_tools.webapp.harness import Database, Webapp

from .conftest import APP_PASSWORD, Clients, not_zero
from .monitors import tag_keys

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "assets" / "dashboards" / "django_db_overview.json"
MONITORS = sorted((ROOT / "assets" / "monitors").glob("*.json"))
MANIFEST = json.loads((ROOT / "manifest.json").read_text())

# OpenTelemetry's names lie outside the integration's prefix, which `ddev validate metadata` holds every
# metadata.csv row to: docs/opentelemetry.md gives their types and units instead.
OTEL = {"db.client.connections.usage", otel.COUNT, otel.MAX, otel.IDLE_MIN, otel.PENDING, otel.TIMEOUTS}

# agg:metric{scope} by {keys}, as in dashboard queries and metric monitors (forecast() included).
METRIC_QUERY = re.compile(
    r"(?:\b(?:avg|sum|min|max):)(?P<metric>[\w.]+)\{(?P<scope>[^}]*)\}(?:\s*by\s*\{(?P<by>[^}]*)\})?"
)
SERVICE_CHECK_QUERY = re.compile(r'^"(?P<check>[\w.]+)"\.over\((?P<over>[^)]*)\)(?:\.by\((?P<by>[^)]*)\))?')
TEMPLATE_VARIABLE = re.compile(r"\{\{\s*([\w.]+)\.name\s*\}\}")


def deserialise(path: Path, model: type, document: dict):
    return ApiClient(Configuration()).deserialize(json.dumps(document), (model,), True)


def misfits(value, path: str = "$") -> list[str]:
    """Where a deserialised value does not fit its model: unparsed parts and fields the model does not know."""
    found = []
    if isinstance(value, UnparsedObject) or getattr(value, "_unparsed", False):
        found.append(f"{path}: does not fit the model")
    if isinstance(value, ModelComposed):
        found += misfits(value.get_oneof_instance(), path)
    elif isinstance(value, ModelNormal):
        known = type(value).openapi_types
        for key, item in value._data_store.items():
            if key not in known:
                found.append(f"{path}.{key}: unknown to {type(value).__name__}")
            found += misfits(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += misfits(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            found += misfits(item, f"{path}.{key}")
    return found


def _keys(text: str | None) -> set[str]:
    return set(tag_keys(text))


def metric_uses(query: str, variables: dict[str, str]) -> dict[str, set[str]]:
    """metric: the tag keys a query filters or groups it on ($var resolved to its tag prefix)."""
    uses: dict[str, set[str]] = defaultdict(set)
    for match in METRIC_QUERY.finditer(query):
        keys = _keys(match["by"])
        for term in _keys(match["scope"]):
            keys.add(variables[term[1:]] if term.startswith("$") else term.lstrip("!").split(":", 1)[0])
        uses[match["metric"]] |= keys
    return uses


def _strings(value, key: str):
    """Every string under `key`, at any depth."""
    if isinstance(value, dict):
        for k, item in value.items():
            if k == key and isinstance(item, str):
                yield item
            else:
                yield from _strings(item, key)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, key)


def _widgets(value):
    if isinstance(value, dict):
        if "definition" in value:
            yield value["definition"]
        for item in value.values():
            yield from _widgets(item)
    elif isinstance(value, list):
        for item in value:
            yield from _widgets(item)


def dashboard_uses(document: dict) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(metric: tag keys, service check: tag keys) of every widget."""
    variables = {v["name"]: v["prefix"] for v in document["template_variables"]}
    metrics: dict[str, set[str]] = defaultdict(set)
    for query in _strings(document["widgets"], "query"):
        for metric, keys in metric_uses(query, variables).items():
            metrics[metric] |= keys
    checks: dict[str, set[str]] = defaultdict(set)
    for widget in _widgets(document["widgets"]):
        if widget.get("type") == "check_status":
            keys = set(widget.get("group_by", []))
            keys |= {variables[t[1:]] if t.startswith("$") else t.split(":", 1)[0] for t in widget.get("tags", [])}
            checks[widget["check"]] |= keys
    return metrics, checks


def monitor_uses(definition: dict) -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """(metric: tag keys, service check: tag keys, group-by keys) of a monitor's query."""
    query = definition["query"]
    if definition["type"] == "service check":
        match = SERVICE_CHECK_QUERY.match(query)
        assert match, query
        by = _keys(match["by"])
        return {}, {match["check"]: by | {t.split(":", 1)[0] for t in _keys(match["over"])}}, by
    uses = metric_uses(query, {})
    by = set().union(*(_keys(m["by"]) for m in METRIC_QUERY.finditer(query)))
    return uses, {}, by


def metadata_rows() -> dict[str, dict]:
    with (ROOT / "metadata.csv").open() as handle:
        return {row["metric_name"]: row for row in csv.DictReader(handle)}


def service_check_names() -> set[str]:
    return {item["check"] for item in json.loads((ROOT / "assets" / "service_checks.json").read_text())}


# -- the files fit Datadog's models -------------------------------------------------------------
def test_the_dashboard_fits_the_api_models():
    document = json.loads(DASHBOARD.read_text())
    dashboard = deserialise(DASHBOARD, Dashboard, document)
    assert isinstance(dashboard, Dashboard)
    assert misfits(dashboard) == []
    assert dashboard.title == document["title"]


def test_a_misspelt_or_mistyped_field_does_not_fit():
    document = json.loads(DASHBOARD.read_text())
    document["widgets"][0]["definition"]["widgets"][1]["definition"]["grouping"] = "nonsense"
    assert misfits(deserialise(DASHBOARD, Dashboard, document)) != []
    definition = json.loads(MONITORS[0].read_text())["definition"]
    definition["options"]["notfiy_no_data"] = True
    assert misfits(deserialise(MONITORS[0], Monitor, definition)) == [
        "$.options.notfiy_no_data: unknown to MonitorOptions"
    ]


@pytest.mark.parametrize("path", MONITORS, ids=[p.stem for p in MONITORS])
def test_each_monitor_fits_the_api_models(path):
    document = json.loads(path.read_text())
    monitor = deserialise(path, Monitor, document["definition"])
    assert isinstance(monitor, Monitor)
    assert misfits(monitor) == []
    assert str(monitor.type) == document["definition"]["type"]


@pytest.mark.parametrize("path", MONITORS, ids=[p.stem for p in MONITORS])
def test_each_monitor_decides_what_missing_data_means(path):
    definition = json.loads(path.read_text())["definition"]
    options = definition["options"]
    if definition["type"] == "service check":
        # The can_connect checks are the ones that page when a server or the check itself goes quiet.
        assert options["notify_no_data"] is True and options["no_data_timeframe"] >= 2
    else:
        # Series stop when their group empties (no leak left, no error): that is a recovery.
        assert options["on_missing_data"] == "resolve"
        assert "notify_no_data" not in options and "no_data_timeframe" not in options


@pytest.mark.parametrize("path", MONITORS, ids=[p.stem for p in MONITORS])
def test_monitor_messages_name_only_their_groups(path):
    definition = json.loads(path.read_text())["definition"]
    _, _, by = monitor_uses(definition)
    assert by, "a monitor of this integration alerts per server, pool or application"
    for text in (definition["name"], definition["message"]):
        assert set(TEMPLATE_VARIABLE.findall(text)) <= by, text


def _groupings(query: str) -> list[tuple[str, set[str]]]:
    """(metric, group-by keys) of every grouped metric query."""
    return [(m["metric"], _keys(m["by"])) for m in METRIC_QUERY.finditer(query) if m["by"]]


def test_pgbouncer_pools_are_told_apart_by_their_pgbouncer():
    """Two PgBouncers may have pools of the same names: a widget or monitor that groups PgBouncer's figures by
    pool groups them by PgBouncer too, so neither's pools hide the other's."""
    queries = list(_strings(json.loads(DASHBOARD.read_text())["widgets"], "query"))
    queries += [json.loads(path.read_text())["definition"]["query"] for path in MONITORS]
    by_pool = [(metric, by) for query in queries for metric, by in _groupings(query) if by & {"pgbouncer_db", "user"}]
    by_pool = [(metric, by) for metric, by in by_pool if metric.startswith("django_db.pgbouncer.")]
    assert by_pool and all("pgbouncer_server" in by for _, by in by_pool), by_pool


def test_every_monitor_is_listed_in_the_manifest():
    listed = {ROOT / p for p in MANIFEST["assets"]["monitors"].values()}
    assert listed == set(MONITORS)


def test_the_forecast_monitor_looks_ahead_at_utilisation():
    definition = json.loads((ROOT / "assets/monitors/postgres_utilization_forecast.json").read_text())["definition"]
    assert definition["query"].startswith("max(next_1d):forecast(max:django_db.postgres.connection_utilization{*}")
    assert definition["query"].endswith(">= 1")
    assert set(definition["options"]["threshold_windows"]) == {"trigger_window", "recovery_window"}


# -- what they use is what the check sends --------------------------------------------------------
def _error_log(path: Path) -> None:
    with path.open("a") as handle:
        handle.write("2026-01-01 00:00:00 UTC [1] FATAL:  sorry, too many clients already\n")
        # PgBouncer's line for a client of the appdb/app pool that waited past query_wait_timeout
        handle.write("2026-01-01 00:00:00.001 UTC [2] WARNING C-0x1: appdb/app@127.0.0.1:1 pooler error: "
                     "query_wait_timeout\n")  # fmt: skip


@pytest.fixture(scope="module")
def submitted(sandbox: Sandbox, mariadb: MariaDB, tmp_path_factory) -> dict[str, set[str]]:
    """metric or service check: every tag key it carried, over real runs that show every kind of data: the
    sandbox's PostgreSQL and PgBouncer, MariaDB, and a Django application with its pool and django-prometheus."""
    from datadog_checks.base.stubs import aggregator

    log = tmp_path_factory.mktemp("logs") / "postgresql.log"
    log.write_text("")
    port = sandbox.postgres.port
    sandbox.pgbouncer.databases["capped"] = (
        f"host=127.0.0.1 port={port} dbname=appdb max_db_connections=4 min_pool_size=1"
    )
    sandbox.pgbouncer.reload()
    instance = {
        **sandbox.instance(),
        "leak_idle_seconds": 1,
        "log_files": [str(log)],
        "apps": [{"match": "^asset-web", "max_connections": 1}],
        "otel_semconv": "both",
    }
    instance["mysql"] = mariadb.instance()
    django = Webapp(
        Database("127.0.0.1", port, "appdb", "app", APP_PASSWORD), app_name="asset-django", pool="django",
        pool_max_size=2, prometheus=True, prometheus_ports=1,
    ).start()  # fmt: skip
    instance["django_metrics"] = [{"url": url, "app": "asset-django"} for url in django.metrics_urls]
    refused = {
        "postgres": {**sandbox.postgres.instance(Sandbox.MONITOR_USER), "password": "wrong"},
        "pgbouncer": {**sandbox.pgbouncer.instance(Sandbox.MONITOR_USER), "password": "wrong"},
        "mysql": {**mariadb.instance(), "password": "wrong"},
    }
    on_mysql = [
        pymysql.connect(host="127.0.0.1", port=mariadb.port, user="app", password=APP_PASSWORD, database="appdb")
        for _ in range(2)
    ]
    with on_mysql[0].cursor() as cursor:
        cursor.execute("UPDATE items SET name = name WHERE id = 1")  # a transaction left open
    # directly twice, and through PgBouncer to appdb and to capped (whose pool keeps min_pool_size)
    bouncer = sandbox.pgbouncer.port
    endpoints = [(port, "appdb"), (port, "appdb"), (bouncer, "appdb"), (bouncer, "capped")]
    held = [
        psycopg.connect(
            host="127.0.0.1",
            port=p,
            user="app",
            password=APP_PASSWORD,
            dbname=dbname,
            application_name="asset-web",
            autocommit=True,
            prepare_threshold=None,
        )
        for p, dbname in endpoints
    ]
    try:
        with not_zero(Clients(sandbox), "asset-web"):
            held[0].execute("BEGIN")
            held[0].execute("SELECT 1")  # idle in transaction
            aggregator.reset()
            check = DjangoDbCheck("django_db", {}, [instance])
            assert check.run() == ""
            django.drive("/query/", count=5)
            django.drive("/error/", count=1)  # a database error, by its exception class
            time.sleep(2.2)  # past leak_idle_seconds, also by PgBouncer's request_time, which counts whole seconds
            _error_log(log)
            assert check.run() == ""
            check.cancel()
            failing = DjangoDbCheck("django_db", {}, [refused])
            assert failing.run() == ""  # refused on both sides: CRITICAL service checks, not a failed run
            failing.cancel()
            keys: dict[str, set[str]] = defaultdict(set)
            for name in aggregator.metric_names:
                for stub in aggregator.metrics(name):
                    keys[name] |= {tag.split(":", 1)[0] for tag in stub.tags}
            for name in aggregator.service_check_names:
                for stub in aggregator.service_checks(name):
                    keys[name] |= {tag.split(":", 1)[0] for tag in stub.tags}
            aggregator.reset()
            return dict(keys)
    finally:
        for conn in held + on_mysql:
            conn.close()
        django.close()
        del sandbox.pgbouncer.databases["capped"]
        sandbox.pgbouncer.reload()


def _check_uses(where: str, metrics: dict[str, set[str]], checks: dict[str, set[str]], submitted) -> list[str]:
    rows, names = metadata_rows(), service_check_names()
    problems = []
    for metric, keys in sorted(metrics.items()):
        if metric not in rows and metric not in OTEL:
            problems.append(f"{where}: {metric} has no metadata.csv row")
        if metric not in submitted:
            problems.append(f"{where}: {metric} is never submitted")
            continue
        for key in sorted(keys - submitted[metric]):
            problems.append(f"{where}: {metric} is never tagged {key} (it carries {sorted(submitted[metric])})")
    for check, keys in sorted(checks.items()):
        if check not in names:
            problems.append(f"{where}: {check} is not in service_checks.json")
        if check not in submitted:
            problems.append(f"{where}: {check} is never submitted")
            continue
        for key in sorted(keys - submitted[check]):
            problems.append(f"{where}: {check} is never tagged {key}")
    return problems


def test_the_run_shows_every_kind_of_error(submitted):
    servers = {"postgres_server", "pgbouncer_server", "mysql_server"}
    assert servers | {"log_file", "signature", "source"} <= submitted["django_db.errors"]


def test_the_dashboard_uses_what_the_check_sends(submitted):
    document = json.loads(DASHBOARD.read_text())
    metrics, checks = dashboard_uses(document)
    assert len(metrics) >= 15 and len(checks) == 5  # the parser found the queries
    servers = {"postgres_server", "pgbouncer_server", "mysql_server"}
    assert metrics["django_db.errors"] == servers | {"signature", "source"}
    assert _check_uses(DASHBOARD.name, metrics, checks, submitted) == []


@pytest.mark.parametrize("path", MONITORS, ids=[p.stem for p in MONITORS])
def test_each_monitor_uses_what_the_check_sends(path, submitted):
    metrics, checks, _ = monitor_uses(json.loads(path.read_text())["definition"])
    assert metrics or checks
    assert _check_uses(path.name, metrics, checks, submitted) == []


def test_a_tag_the_check_never_sends_is_caught(submitted):
    metrics = metric_uses("sum:django_db.errors{*} by {postgres_server,host_port}.as_count()", {})
    assert _check_uses("x", metrics, {}, submitted) == [
        f"x: django_db.errors is never tagged host_port (it carries {sorted(submitted['django_db.errors'])})"
    ]
    assert _check_uses("x", {"django_db.nothing": set()}, {}, submitted) == [
        "x: django_db.nothing has no metadata.csv row",
        "x: django_db.nothing is never submitted",
    ]


# -- manifest and licence -----------------------------------------------------------------------
def test_the_manifest_check_metrics_come_from_either_side(sandbox):
    from datadog_checks.base.stubs import aggregator

    listed = MANIFEST["assets"]["integration"]["metrics"]["check"]
    assert isinstance(listed, list) and set(listed) <= set(metadata_rows())
    for side in ("postgres", "pgbouncer"):
        aggregator.reset()
        check = DjangoDbCheck("django_db", {}, [{side: sandbox.instance()[side]}])
        assert check.run() == ""
        check.cancel()
        assert set(listed) & set(aggregator.metric_names), f"an instance with {side} only sends none of {listed}"
    aggregator.reset()


def test_the_manifest_claims_only_what_is_true():
    text = json.dumps(MANIFEST)
    assert ".example" not in text and "integrations-extras" not in text
    assert set(MANIFEST["author"]) == {"name"}
    systems = [t for t in MANIFEST["tile"]["classifier_tags"] if t.startswith("Supported OS::")]
    assert systems == ["Supported OS::Linux"]


def test_the_licence_is_the_one_pyproject_declares():
    assert 'license = "BSD-3-Clause"' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text
