"""Secrets are masked where they appear (connection parameters, URLs), never as a substring of other words."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.redact import MASK, redact
from django_db_tools import cli
from django_db_tools.sandbox import Sandbox


@pytest.mark.parametrize(
    "text, secret",
    [
        ("host=h port=5432 user=u password=hunter2 dbname=d", "hunter2"),
        ("host=h password='two words' dbname=d", "two words"),
        ("host=h password='it\\'s' dbname=d", "it\\'s"),
        ("PGPASSWORD=hunter2 psql", "hunter2"),
        ("{'host': 'h', 'password': 'hunter2'}", "hunter2"),
        ('{"password": "hunter2", "port": 1}', "hunter2"),
        ("password: hunter2", "hunter2"),
        ("postgresql://u:hunter2@h:5432/db", "hunter2"),
        ("see postgres://app:hunter2@10.0.0.1/db?sslmode=require", "hunter2"),
        ("url http://h/x?user=u&password=hunter2&x=1", "hunter2"),
        ("api_key=abc123 token=def456", "abc123"),
    ],
)
def test_secrets_in_parameters_and_urls_are_masked(text, secret):
    masked = redact(text)
    assert secret not in masked and MASK in masked, masked


@pytest.mark.parametrize(
    "text",
    [
        'connection to server at "127.0.0.1", port 5432 failed: Connection refused',
        'FATAL:  password authentication failed for user "datadog"',
        "postgresql://h:5432/db",
        "token bucket on the connection",
    ],
)
def test_ordinary_words_are_kept(text):
    assert redact(text) == text


def test_a_short_password_leaves_the_message_whole(aggregator, dd_run_check, sandbox):
    """With password `on`, the message once read `c********necti********`."""
    instance = {"postgres": {**sandbox.postgres.instance(Sandbox.MONITOR_USER), "password": "on"}}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    [status] = aggregator.service_checks("django_db.postgres.can_connect")
    assert status.status == AgentCheck.CRITICAL
    assert "password authentication failed" in status.message and "connection" in status.message
    assert MASK not in status.message
    check.cancel()


def test_the_runner_prints_ordinary_words_whole(tmp_path, sandbox):
    conf = tmp_path / "conf.yaml"
    instance = {"postgres": {**sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD)}}
    instance["postgres"]["password"] = "on"
    conf.write_text(yaml.safe_dump({"init_config": {}, "instances": [instance]}))
    out = io.StringIO()
    assert cli.main(["check", "-c", str(conf), "--json"], out, io.StringIO()) == 0
    [item] = json.loads(out.getvalue())
    [can_connect] = [c for c in item["aggregator"]["service_checks"] if c["check"] == "django_db.postgres.can_connect"]
    assert "authentication" in can_connect["message"] and "connection" in can_connect["message"]
    assert MASK not in out.getvalue()
