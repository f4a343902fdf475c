"""A managed service's own sessions and reserved slots, on real servers standing in for RDS and Azure: the providers'
roles and databases (rdsadmin, azuresu, cloudsqladmin ...) and their reserve settings, as placeholders in
postgresql.conf, which is how such a setting reads on a server without the provider's extension."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pymysql
import pytest

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.sandbox import Sandbox

from .conftest import APP_PASSWORD, metric_values

PASSWORD = "provider-pw"
RDS_RESERVES = {"rds.rds_superuser_reserved_connections": "2", "rds.rds_reserved_connections": "4"}


def start(settings: dict[str, str], with_pgbouncer: bool = False) -> Sandbox:
    box = Sandbox(max_connections=40, pg_settings=settings).start(with_pgbouncer=with_pgbouncer)
    try:
        roles = ("rdsadmin", "azuresu", "cloudsqladmin", "ops_robot", "web_user")
        box.psql("".join(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}';" for role in roles))
        for database in ("rdsadmin", "azure_maintenance", "shop"):
            box.psql(f"CREATE DATABASE {database}")
    except BaseException:
        box.close()
        raise
    return box


@pytest.fixture(scope="module")
def rds() -> Iterator[Sandbox]:
    box = start(RDS_RESERVES, with_pgbouncer=True)  # in front: the timeouts of roles are judged
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def sessions(rds: Sandbox) -> Iterator[list[psycopg.Connection]]:
    """The providers' sessions idle for long (one in a transaction), a user-listed one, and one real leak (web)."""
    held = []

    def connect(user: str, dbname: str, app: str) -> psycopg.Connection:
        conn = psycopg.connect(
            host="127.0.0.1", port=rds.postgres.port, user=user, password=PASSWORD, dbname=dbname,
            application_name=app, autocommit=True, connect_timeout=5,
        )  # fmt: skip
        held.append(conn)
        return conn

    connect("rdsadmin", "rdsadmin", "")
    connect("azuresu", "postgres", "psql")
    connect("cloudsqladmin", "postgres", "").execute("BEGIN; SELECT 1")  # idle in transaction
    connect("ops_robot", "postgres", "")
    connect("web_user", "shop", "web")
    time.sleep(1.3)  # idle past leak_idle_seconds, and the transaction past its warning
    try:
        yield held
    finally:
        for conn in held:
            conn.close()


def instance(box: Sandbox, **extra: object) -> dict:
    return {
        "postgres": box.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD),
        "leak_idle_seconds": 1,
        "thresholds": {"idle_in_transaction_seconds": {"warning": 0.5}},
        "apps": [{"match": "^(web|psql|)$", "name": "everyone", "max_connections": 1}],
        "provider_sessions": {"users": ["ops_robot"]},
        **extra,
    }


def run(aggregator, dd_run_check, config: dict) -> None:
    aggregator.reset()
    check = DjangoDbCheck("django_db", {}, [config])
    try:
        dd_run_check(check)
        dd_run_check(check)  # sessions are counted from the second run
    finally:
        check.cancel()


def test_the_providers_sessions_are_theirs_not_an_applications(aggregator, dd_run_check, rds, sessions):
    config = instance(rds, pgbouncer=rds.pgbouncer.instance(Sandbox.MONITOR_USER))
    run(aggregator, dd_run_check, config)
    series = aggregator.metrics("django_db.postgres.connections")
    last = {tuple(sorted(m.tags)): m.value for m in series}
    provider = {tags: n for tags, n in last.items() if "app:provider" in tags}
    users = sorted(tag for tags in provider for tag in tags if tag.startswith("user:"))
    assert users == ["user:azuresu", "user:cloudsqladmin", "user:ops_robot", "user:rdsadmin"]
    assert sum(provider.values()) == 4
    assert not [tags for tags in last if "app:none" in tags]
    # The one application's leak is told; none of the providers' sessions idle as long, nor their transaction.
    leaked = {tuple(sorted(m.tags)): m.value for m in aggregator.metrics("django_db.postgres.leaked_connections")}
    assert [(tags, n) for tags, n in leaked.items() if n] == [
        (tuple(sorted((f"postgres_server:127.0.0.1:{rds.postgres.port}", "db:shop", "user:web_user", "app:web"))), 1)
    ]
    findings = {tuple(sorted(m.tags)) for m in aggregator.metrics("django_db.finding") if m.value}
    assert not [tags for tags in findings if "finding:idle_in_transaction" in tags or "finding:over_budget" in tags]
    assert [tags for tags in findings if "finding:leaked_connections" in tags and "app:web" in tags]
    # The budget counts the application's one connection, not the nameless or psql sessions of the providers.
    assert metric_values(aggregator, "django_db.app.connections", "app:everyone", "counted_at:postgres")[-1] == 1
    # Their roles' timeouts are theirs: only the application's role is named.
    [alignment] = aggregator.service_checks("django_db.config_alignment")[-1:]
    assert "web_user@shop" in alignment.message
    for role in ("rdsadmin", "azuresu", "cloudsqladmin", "ops_robot"):
        assert role not in alignment.message
    # Their database is left out of the per-database session series, as Datadog's own check leaves it.
    opened = {tag for m in aggregator.metrics("django_db.postgres.sessions.opened") for tag in m.tags}
    assert "db:shop" in opened and "db:rdsadmin" not in opened


def test_rds_reserves_come_off_the_usable_slots(aggregator, dd_run_check, rds, sessions):
    run(aggregator, dd_run_check, instance(rds))
    server = f"postgres_server:127.0.0.1:{rds.postgres.port}"
    assert metric_values(aggregator, "django_db.postgres.max_connections", server)[-1] == 40
    # superuser_reserved_connections 3, rds.rds_superuser_reserved_connections 2, rds.rds_reserved_connections 4
    assert metric_values(aggregator, "django_db.postgres.reserved_connections", server)[-1] == 9
    used = 5 + 1  # the five sessions and the check's own
    assert metric_values(aggregator, "django_db.postgres.connections_available", server)[-1] == 40 - 9 - used
    utilization = metric_values(aggregator, "django_db.postgres.connection_utilization", server)[-1]
    assert utilization == pytest.approx(used / 31)


def test_azure_keeps_fifteen_slots(aggregator, dd_run_check):
    box = start({"azure.extensions": "''"})
    try:
        with psycopg.connect(
            host="127.0.0.1", port=box.postgres.port, user="azuresu", password=PASSWORD, dbname="azure_maintenance",
            connect_timeout=5,
        ):  # fmt: skip
            run(aggregator, dd_run_check, instance(box))
    finally:
        box.close()
    server = f"postgres_server:127.0.0.1:{box.postgres.port}"
    assert metric_values(aggregator, "django_db.postgres.reserved_connections", server)[-1] == 15
    assert metric_values(aggregator, "django_db.postgres.connections_available", server)[-1] == 40 - 15 - 2
    provider = metric_values(aggregator, "django_db.postgres.connections", "app:provider", "db:azure_maintenance")
    assert provider[-1] == 1


def test_a_mysql_providers_user_is_no_leak(aggregator, dd_run_check, mariadb):
    mariadb.sql(f"CREATE USER 'rdsadmin'@'%' IDENTIFIED BY '{PASSWORD}';")
    held = [
        pymysql.connect(host="127.0.0.1", port=mariadb.port, user=user, password=password, database="")
        for user, password in (("rdsadmin", PASSWORD), ("app", APP_PASSWORD))
    ]
    try:
        time.sleep(2.1)  # MySQL counts idle time in whole seconds
        config = {"mysql": mariadb.instance(), "leak_idle_seconds": 1}
        run(aggregator, dd_run_check, config)
    finally:
        for conn in held:
            conn.close()
        mariadb.sql("DROP USER 'rdsadmin'@'%';")
    leaked = {tuple(sorted(m.tags)): m.value for m in aggregator.metrics("django_db.mysql.leaked_connections")}
    assert [tags for tags, n in leaked.items() if n and "user:app" in tags]
    assert not [tags for tags, n in leaked.items() if n and "user:rdsadmin" in tags]
    provider = metric_values(aggregator, "django_db.mysql.connections", "user:rdsadmin", "client_host:provider")
    assert provider and provider[-1] == 1
