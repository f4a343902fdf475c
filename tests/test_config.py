"""Configuration errors name the key at fault and raise ConfigurationError at start."""

from __future__ import annotations

import pytest
from datadog_checks.base import ConfigurationError

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import default_leak_idle_seconds, parse

PG = {"host": "127.0.0.1", "port": 5432, "username": "datadog", "password": "s3cret"}


@pytest.mark.parametrize(
    "instance, key",
    [
        ({}, "`postgres` section"),
        ({"postgres": {**PG, "port": "not-a-port"}}, "postgres.port"),
        ({"postgres": {**PG, "port": 70000}}, "postgres.port"),
        ({"postgres": {**PG, "port": True}}, "postgres.port"),
        ({"pgbouncer": {"port": 0}}, "pgbouncer.port"),
        ({"postgres": {**PG, "connect_timeout": -1}}, "postgres.connect_timeout"),
        ({"postgres": {**PG, "query_timeout": 0}}, "postgres.query_timeout"),
        ({"pgbouncer": {"query_timeout": -5}}, "pgbouncer.query_timeout"),
        ({"postgres": {**PG, "sslmode": "sometimes"}}, "postgres.sslmode"),
        ({"postgres": {**PG, "hostname": "x"}}, "unknown option 'hostname'"),
        ({"postgres": PG, "thresholds": {"utilization": {"warning": "high"}}}, "thresholds.utilization.warning"),
        ({"postgres": PG, "thresholds": {"utilization": {"warning": 0.95, "critical": 0.9}}}, "thresholds.utilization"),
        ({"postgres": PG, "thresholds": {"utilisation": {"warning": 0.5}}}, "unknown option 'utilisation'"),
        ({"postgres": PG, "group_by": ["db", "host"]}, "group_by[1]"),
        ({"postgres": PG, "group_by": ["db", "db"]}, "group_by"),
        ({"postgres": PG, "group_by": "db"}, "group_by"),
        ({"postgres": PG, "max_tag_values": 0}, "max_tag_values"),
        ({"postgres": PG, "leak_idle_seconds": -3}, "leak_idle_seconds"),
        ({"postgres": PG, "conn_max_age": "forever"}, "conn_max_age"),
        ({"postgres": PG, "applications": {"include": ["(unclosed"]}}, "applications.include[0]"),
        ({"postgres": PG, "log_files": "/var/log/x.log"}, "log_files"),
        ({"postgres": PG, "report_leak_queries": "yes"}, "report_leak_queries"),
    ],
)
def test_bad_config_names_the_key(instance, key):
    with pytest.raises(ConfigurationError) as error:
        DjangoDbCheck("django_db", {}, [instance])
    assert key in str(error.value)
    assert "s3cret" not in str(error.value)


def test_defaults():
    settings = parse({"postgres": PG})
    assert settings.postgres.connect_timeout == 5 and settings.postgres.query_timeout == 5
    assert settings.group_by == ("db", "user", "app")
    assert settings.max_tag_values == 50
    assert settings.conn_max_age == 0  # Django's own default
    assert settings.leak_idle_seconds == 300
    assert settings.thresholds.utilization.warning == 0.8
    assert settings.thresholds.idle_in_transaction_count.critical == 50
    assert settings.pgbouncer is None
    assert "s3cret" not in repr(settings)


def test_partial_threshold_keeps_the_other_level():
    settings = parse({"postgres": PG, "thresholds": {"utilization": {"warning": 0.7}}})
    assert settings.thresholds.utilization.warning == 0.7
    assert settings.thresholds.utilization.critical == 0.9


def test_pgbouncer_always_uses_the_console_database():
    settings = parse({"pgbouncer": {}})
    assert settings.pgbouncer.dbname == "pgbouncer" and settings.pgbouncer.port == 6432
    with pytest.raises(ConfigurationError, match="unknown option 'dbname'"):
        parse({"pgbouncer": {"dbname": "appdb"}})


@pytest.mark.parametrize("conn_max_age, expected", [(None, 600), (0, 300), (60, 300), (600, 1200)])
def test_leak_threshold_follows_conn_max_age(conn_max_age, expected):
    assert default_leak_idle_seconds(conn_max_age) == expected
    assert parse({"postgres": PG, "conn_max_age": conn_max_age}).leak_idle_seconds == expected


def test_explicit_leak_threshold_wins():
    assert parse({"postgres": PG, "conn_max_age": None, "leak_idle_seconds": 42}).leak_idle_seconds == 42


def test_name_filters_match_anywhere_unless_anchored():
    settings = parse({"postgres": PG, "applications": {"include": ["^web"], "exclude": ["admin"]}})
    assert settings.applications.allows("web-1")
    assert not settings.applications.allows("celery-web")
    assert not settings.applications.allows("web-admin")
    assert parse({"postgres": PG}).applications.allows("")
