"""Configuration errors name the key at fault and raise ConfigurationError at start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from datadog_checks.base import ConfigurationError

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import default_leak_idle_seconds, parse

ROOT = Path(__file__).resolve().parent.parent
PG = {"host": "127.0.0.1", "port": 5432, "username": "datadog", "password": "s3cret"}


@pytest.mark.parametrize(
    "instance, key",
    [
        ({}, "`postgres` section"),
        ({"postgres": {**PG, "port": "not-a-port"}}, "postgres.port"),
        ({"postgres": {**PG, "port": 70000}}, "postgres.port"),
        ({"postgres": {**PG, "port": True}}, "postgres.port"),
        ({"pgbouncer": {"port": 0}}, "pgbouncer.port"),
        ({"pgbouncer": [{"port": 6432}, {"port": 0}]}, "pgbouncer[1].port"),
        ({"pgbouncer": [{"port": 6432}, {"port": 6432, "sslmode": "maybe"}]}, "pgbouncer[1].sslmode"),
        ({"pgbouncer": [{"port": 6432}, {"port": 6432}]}, "pgbouncer[1]"),
        ({"pgbouncer": [{"name": "a"}, {"port": 7000, "name": "a"}]}, "pgbouncer[1]"),
        ({"pgbouncer": [{"port": 6432}, "host=x"]}, "pgbouncer[1]"),
        ({"pgbouncer": []}, "pgbouncer"),
        ({"pgbouncer": [{"hots": "x"}]}, "unknown option 'hots'"),
        ({"postgres": PG, "pooler_addresses": ["10.0.0.0/33"]}, "pooler_addresses[0]"),
        ({"postgres": PG, "pooler_addresses": ["sidecar.local"]}, "pooler_addresses[0]"),
        ({"postgres": PG, "pooler_addresses": "10.0.0.0/8"}, "pooler_addresses"),
        ({"mysql": {"port": 99999}}, "mysql.port"),
        ({"mysql": {"query_timeout": 0}}, "mysql.query_timeout"),
        ({"mysql": {"dbname": "appdb"}}, "unknown option 'dbname'"),
        ({"mysql": {"sslmode": "require"}}, "unknown option 'sslmode'"),
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
        # Values that raised another exception, or passed and failed on every run.
        ({"postgres": {**PG, "port": "²"}}, "postgres.port"),
        ({"postgres": PG, "max_tag_values": "²"}, "max_tag_values"),
        ({"postgres": PG, "conn_max_age": 10**400}, "conn_max_age"),
        ({"postgres": PG, "max_tag_values": 10**5000}, "max_tag_values"),
        ({"postgres": PG, "max_tag_values": "9" * 5000}, "max_tag_values"),
        ({"postgres": PG, "leak_idle_seconds": "1e999"}, "leak_idle_seconds"),
        ({"postgres": PG, 0: 1, "x": 2}, "option names must be strings"),
        ({"postgres": {**PG, 0: 1, "x": 2}}, "`postgres`: option names must be strings"),
        ({"postgres": PG, "thresholds": {0: 1, "x": 2}}, "`thresholds`: option names must be strings"),
        ({"postgres": PG, "applications": {"include": ["a{99999999999}"]}}, "applications.include[0]"),
        ({"postgres": PG, "metric_patterns": {"include": ["(("]}}, "metric_patterns.include[0]"),
        ({"postgres": {**PG, "query_timeout": 3000000}}, "postgres.query_timeout"),
        ({"postgres": PG, "log_max_bytes_per_run": 10**19}, "log_max_bytes_per_run"),
        ({"pgbouncer": {"query_timeout": 1e10}}, "pgbouncer.query_timeout"),
        ({"pgbouncer": {"connect_timeout": float("inf")}}, "pgbouncer.connect_timeout"),
        ({"postgres": {**PG, "password": 12345}}, "postgres.password"),
        ({"postgres": {**PG, "host": ""}}, "postgres.host"),
        ({"postgres": {**PG, "host": "a\x00b"}}, "postgres.host"),
        ({"postgres": PG, "tags": ["a", 3]}, "tags[1]"),
        ({"postgres": PG, "service": 5}, "service"),
        ({"postgres": PG, "debug_metrics": 5}, "debug_metrics"),
        ({"postgres": PG, "extra_metrics": ["pgbouncer_stats", "pgbouncer_statz"]}, "extra_metrics[1]"),
        ({"postgres": PG, "extra_metrics": "pgbouncer_stats"}, "extra_metrics"),
    ],
)
def test_bad_config_names_the_key(instance, key):
    with pytest.raises(ConfigurationError) as error:
        DjangoDbCheck("django_db", {}, [instance])
    assert key in str(error.value)
    assert "s3cret" not in str(error.value)
    assert len(str(error.value)) < 300


@pytest.mark.parametrize("instance", [[PG], True, 1, None, "postgres"])
def test_an_instance_that_is_no_mapping_is_refused(instance):
    with pytest.raises(ConfigurationError, match="the instance must be a mapping"):
        DjangoDbCheck("django_db", {}, [instance])


def test_an_option_only_the_base_class_reads_raises_configuration_error():
    with pytest.raises(ConfigurationError, match="an option of the Agent's own is malformed"):
        DjangoDbCheck("django_db", {"debug_metrics": 5}, [{"postgres": PG}])


def test_messages_keep_their_friendly_form():
    with pytest.raises(ConfigurationError) as error:
        DjangoDbCheck("django_db", {}, [{"postgres": {**PG, "port": 70000}}])
    assert str(error.value) == "`postgres.port`: must be from 1 to 65535 (got 70000)"


@pytest.mark.parametrize(
    "section",
    ["postgresql://u:pw-9f2e@h/db", "postgres://u:pw-9f2e@h:5432/db?sslmode=require", "host=h user=u password=pw-9f2e"],
)
def test_a_connection_string_is_refused_without_its_password(section):
    with pytest.raises(ConfigurationError) as error:
        DjangoDbCheck("django_db", {}, [{"postgres": section}])
    assert "`postgres`: must be a mapping" in str(error.value) and "connection string" in str(error.value)
    assert "pw-9f2e" not in str(error.value)


def test_a_password_pasted_in_another_field_is_not_echoed():
    for value in ("s3cret", "postgresql://u:hunter-22@h/db"):
        with pytest.raises(ConfigurationError) as error:
            DjangoDbCheck("django_db", {}, [{"postgres": {**PG, "port": value}}])
        assert "postgres.port" in str(error.value) and "********" in str(error.value)
        assert "s3cret" not in str(error.value) and "hunter-22" not in str(error.value)


def test_a_number_given_as_text_is_read():
    settings = parse({"postgres": {**PG, "port": " 6543 ", "query_timeout": "2.5"}, "max_tag_values": "7"})
    assert settings.postgres.port == 6543 and settings.postgres.query_timeout == 2.5
    assert settings.max_tag_values == 7


def test_the_check_validates_its_models_at_construction():
    check = DjangoDbCheck("django_db", {}, [{"postgres": PG, "max_tag_values": 9}])
    assert check._config_model_instance is not None and check._config_model_instance.max_tag_values == 9
    assert check.settings.max_tag_values == 9


def test_defaults_follow_the_spec():
    """The defaults of the levels are the spec's example, as conf.yaml.example shows them."""
    spec = yaml.safe_load((ROOT / "assets" / "configuration" / "spec.yaml").read_text())
    [instances] = [o for o in spec["files"][0]["options"] if o.get("template") == "instances"]
    options = {o["name"]: o for o in instances["options"] if "name" in o}
    example = options["thresholds"]["value"]["example"]
    levels = parse({"postgres": PG}).thresholds
    for name, given in example.items():
        level = getattr(levels, name)
        assert (level.warning, level.critical) == (given.get("warning"), given.get("critical")), name
    assert list(parse({"postgres": PG}).group_by) == options["group_by"]["value"]["example"]
    for key in ("port", "connect_timeout", "query_timeout", "username", "dbname"):
        assert getattr(parse({"postgres": {}}).postgres, key) == options["postgres"]["value"]["example"][key], key


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


def test_a_wrong_metric_group_is_named_with_the_known_ones():
    with pytest.raises(ConfigurationError) as error:
        DjangoDbCheck("django_db", {}, [{"postgres": PG, "extra_metrics": ["connection_usage"]}])
    assert "extra_metrics[0]" in str(error.value) and "'connection_usage'" in str(error.value)
    assert "connections_usage" in str(error.value)
    assert parse({"postgres": PG}).extra_metrics == frozenset()
    assert parse({"postgres": PG, "extra_metrics": ["pgbouncer_lists"]}).extra_metrics == {"pgbouncer_lists"}


def test_a_mysql_section_alone():
    settings = parse({"mysql": {"host": "db.internal", "password": "s3cret"}})
    assert settings.mysql.port == 3306 and settings.mysql.username == "datadog"
    assert settings.mysql.tag == "mysql_server:db.internal:3306"
    assert settings.postgres is None and settings.pgbouncer is None
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


def test_several_pgbouncers_each_with_its_own_tag():
    settings = parse(
        {
            "postgres": PG,
            "pgbouncer": [
                {"host": "/var/run/pgbouncer-1", "port": 6432},
                {"host": "/var/run/pgbouncer-2", "port": 6432, "name": "pgb-2"},
            ],
            "pooler_addresses": ["10.42.0.7", "fd00:42::/64", "10.42.1.0/24"],
        }
    )
    assert [e.tag for e in settings.pgbouncers] == [
        "pgbouncer_server:/var/run/pgbouncer-1:6432",
        "pgbouncer_server:pgb-2",
    ]
    assert settings.pgbouncer == settings.pgbouncers[0]
    assert settings.pooler_networks == ("10.42.0.7/32", "fd00:42::/64", "10.42.1.0/24")
    one = parse({"postgres": PG, "pgbouncer": {"port": 6432}})
    assert one.pgbouncers == (one.pgbouncer,) and one.pgbouncer is not None
    assert one.pgbouncer.tag == "pgbouncer_server:localhost:6432"


def _option_names(value: dict) -> set[str]:
    """The names of an option value's properties, at any depth (objects, lists of objects, anyOf)."""
    names: set[str] = set()
    for prop in value.get("properties", ()):
        names |= {prop["name"]} | _option_names(prop)
    for part in [*value.get("anyOf", ()), *([value["items"]] if "items" in value else [])]:
        names |= _option_names(part)
    return names


def test_the_example_shows_every_option_of_the_spec():
    spec = yaml.safe_load((ROOT / "assets" / "configuration" / "spec.yaml").read_text())
    [instances] = [o for o in spec["files"][0]["options"] if o.get("template") == "instances"]
    names = set()
    for option in instances["options"]:
        if "name" in option:
            names |= {option["name"]} | _option_names(option["value"])
    example = (ROOT / "conf.yaml.example").read_text()
    assert {"sslrootcert", "sslcert", "sslkey", "warning", "critical"} <= names
    assert sorted(n for n in names if not re.search(rf"\b{re.escape(n)}\b:", example)) == []
