"""Every metric the check submits has a metadata.csv row of the right type."""

from __future__ import annotations

import time

import pytest
from datadog_checks.dev.utils import get_metadata_metrics

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import METRIC_GROUPS

from .conftest import not_zero

# The OpenTelemetry semantic-convention name lies outside the django_db. prefix, which
# metadata.csv may not hold; its meaning is fixed by the convention and the README.
OTEL = ["db.client.connections.usage"]
DJANGO = "django_db.django."


@pytest.fixture
def traffic(sandbox, clients):
    # A database with a server connection limit: without one, its max_connections is not sent.
    port = sandbox.postgres.port
    sandbox.pgbouncer.databases["capped"] = f"host=127.0.0.1 port={port} dbname=appdb max_db_connections=4"
    sandbox.pgbouncer.reload()
    for conn in clients.many(3, app="meta-app", dbname="appdb", port=sandbox.pgbouncer.port, prepare_threshold=None):
        conn.execute("SELECT 1")
    with not_zero(clients, "meta-app"):
        yield
    del sandbox.pgbouncer.databases["capped"]
    sandbox.pgbouncer.reload()


def test_metrics_use_metadata(aggregator, dd_run_check, sandbox, traffic):
    apps = [{"match": "^meta-app$", "max_connections": 2}]
    instance = {**sandbox.instance(), "leak_idle_seconds": 1, "apps": apps, "extra_metrics": list(METRIC_GROUPS)}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    time.sleep(2.1)  # past leak_idle_seconds (PgBouncer counts whole seconds): idle connections and clients leak
    dd_run_check(check)
    check.cancel()
    refused = DjangoDbCheck(
        "django_db", {}, [{"pgbouncer": {**sandbox.pgbouncer.instance("datadog"), "password": "no"}}]
    )
    dd_run_check(refused)  # django_db.errors
    aggregator.assert_metrics_using_metadata(get_metadata_metrics(), exclude=OTEL)
    submitted = {name for name in aggregator.metric_names}
    assert {"db.client.connections.usage", "django_db.pgbouncer.stats.transactions"} <= submitted
    # Every row of metadata.csv is a metric the check can submit on PostgreSQL 15 and PgBouncer 1.18;
    # the Django processes' metrics are submitted, and checked, in test_django_client.py; the MySQL rows
    # in test_mysql.py.
    others = {m for m in get_metadata_metrics() if m.startswith((DJANGO, "django_db.mysql."))}
    assert set(get_metadata_metrics()) - others - submitted == set()
