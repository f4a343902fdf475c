"""No false alarms: backends still starting are not hidden ones; settings are judged where they apply."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import psycopg
import pytest

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.alignment import timeouts
from datadog_checks.django_db.evaluate.model import Subject
from datadog_checks.django_db.records import ActivityGroup, PgbConfig, PgbSnapshot, PgSnapshot, ServerSettings
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox

from .conftest import APP_PASSWORD, Clients, looping, metric_values, run_new_check


@contextmanager
def churn(sandbox: Sandbox, user: str, password: str, threads: int = 3) -> Iterator[None]:
    """Threads that connect and disconnect as fast as they can until the block ends."""

    def connect_once() -> None:
        try:
            psycopg.connect(
                host="127.0.0.1", port=sandbox.postgres.port, user=user, password=password,
                dbname="appdb", application_name="churn", connect_timeout=5,
            ).close()  # fmt: skip
        except psycopg.OperationalError:
            time.sleep(0.01)

    with looping(connect_once, threads):
        yield


def runs_under_churn(
    aggregator, dd_run_check, check: DjangoDbCheck, states: tuple[str, ...] = ("starting",), enough: int = 5
) -> Iterator[str]:
    """Runs of the check until it has counted ``enough`` connections in ``states`` (at most 600 runs or
    90 s): yields each run's connection_health message."""
    seen, deadline = 0.0, time.monotonic() + 90
    for _ in range(600):
        if seen >= enough or time.monotonic() > deadline:
            break
        aggregator.reset()
        dd_run_check(check)
        for state in states:
            seen += sum(metric_values(aggregator, "django_db.postgres.connections", f"state:{state}"))
        yield aggregator.service_checks("django_db.connection_health")[-1].message or ""
    assert seen >= 1, f"the churn never showed a backend in {states}"


def test_starting_backends_are_not_hidden_from_a_pg_monitor_role(aggregator, dd_run_check, quiet_box):
    # On a server of its own: the suite's shared one may be near max_connections with what other tests
    # left, and a refused login never shows as a starting backend.
    check = DjangoDbCheck("django_db", {}, [quiet_box.instance(with_pgbouncer=False)])
    try:
        with churn(quiet_box, "app", APP_PASSWORD):
            # Counting the hidden ones too: each would be a false alarm.
            for text in runs_under_churn(aggregator, dd_run_check, check, ("starting", "unknown")):
                assert "hidden" not in text, text
                assert metric_values(aggregator, "django_db.postgres.connections", "state:unknown") == []
    finally:
        check.cancel()


@pytest.fixture(scope="module")
def quiet_box() -> Iterator[Sandbox]:
    """A server of this module's own: no backend but those a test opens, none left over by other tests."""
    with Sandbox(max_connections=30) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';CREATE ROLE plain LOGIN PASSWORD '{APP_PASSWORD}';")
        box.psql("CREATE DATABASE appdb OWNER app")
        yield box


def test_a_role_without_pg_monitor_counts_only_the_backends_really_hidden(aggregator, dd_run_check, quiet_box):
    # `plain` sees its own backends in full, starting ones included; `app`'s two are hidden from it,
    # and on this server they are the only backends of another role.
    clients = Clients(quiet_box)
    check = DjangoDbCheck("django_db", {}, [{"postgres": quiet_box.postgres.instance("plain", APP_PASSWORD)}])
    try:
        clients.many(2, app="hidden-app")
        with churn(quiet_box, "plain", APP_PASSWORD):
            for text in runs_under_churn(aggregator, dd_run_check, check):
                assert "WARNING: 2 backends are hidden from the monitoring role: GRANT pg_monitor TO plain" in text
    finally:
        check.cancel()
        clients.close()


# -- Settings judged where they apply ---------------------------------------------------------


@pytest.fixture(scope="module")
def timeouts_box() -> Iterator[Sandbox]:
    with Sandbox(max_connections=30) as box:
        box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        box.psql("CREATE DATABASE appdb OWNER app")
        yield box


def timeout_rules(aggregator, dd_run_check, box: Sandbox, user: str, password: str) -> str:
    """The config_alignment message of one run while `app` holds a connection to `appdb`."""
    with psycopg.connect(host="127.0.0.1", port=box.postgres.port, user="app", password=APP_PASSWORD, dbname="appdb"):
        instance = {"postgres": box.postgres.instance(user, password), "pgbouncer": box.pgbouncer.instance()}
        run_new_check(aggregator, dd_run_check, instance)
    message = aggregator.service_checks("django_db.config_alignment")[-1].message or ""
    return "; ".join(part for part in message.split("; ") if "timeout" in part and "app@appdb" in part)


def test_the_monitoring_roles_own_statement_timeout_does_not_silence_the_rule(aggregator, dd_run_check, timeouts_box):
    box, monitor = timeouts_box, (Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD)
    assert "both unset for app@appdb" in timeout_rules(aggregator, dd_run_check, box, *monitor)
    box.psql("ALTER ROLE datadog SET statement_timeout = '30s'")
    try:
        # pg_monitor may not read pg_file_settings: the server's value cannot be known, and the rule says so.
        text = timeout_rules(aggregator, dd_run_check, box, *monitor)
        assert text.startswith("cannot tell whether statement_timeout or idle_in_transaction_session_timeout")
        assert "statement_timeout (source user)" in text and "ALTER ROLE datadog RESET statement_timeout" in text
        assert "both unset" not in text
        # The application's own role setting is what applies to it.
        box.psql("ALTER ROLE app SET statement_timeout = '10s'")
        assert timeout_rules(aggregator, dd_run_check, box, *monitor) == ""
    finally:
        box.psql("ALTER ROLE datadog RESET statement_timeout")
        box.psql("ALTER ROLE app RESET statement_timeout")


def test_a_superuser_reads_the_servers_value_past_its_own(aggregator, dd_run_check, timeouts_box):
    box, superuser = timeouts_box, (SUPERUSER, SUPERUSER_PASSWORD)
    box.psql(f"ALTER ROLE {SUPERUSER} SET idle_in_transaction_session_timeout = '1min'")
    box.psql(f"ALTER ROLE {SUPERUSER} SET statement_timeout = '30s'")
    try:
        assert "both unset for app@appdb" in timeout_rules(aggregator, dd_run_check, box, *superuser)
        box.psql("ALTER SYSTEM SET statement_timeout = '20s'")
        box.psql("SELECT pg_reload_conf()")
        assert timeout_rules(aggregator, dd_run_check, box, *superuser) == ""
    finally:
        box.psql("ALTER SYSTEM RESET statement_timeout")
        box.psql("SELECT pg_reload_conf()")
        box.psql(f"ALTER ROLE {SUPERUSER} RESET ALL")


def test_an_unknown_server_value_is_said_not_guessed():
    settings = parse({"postgres": {"host": "h", "username": "datadog", "dbname": "postgres"}, "pgbouncer": {}})
    masked = ServerSettings(
        150000, "15.0", 100, 3, 0, 30000, 0,
        role_settings=(("", "datadog", {"statement_timeout": "30s"}), ("", "worker", {"statement_timeout": "5s"})),
        masked=(("statement_timeout", "user"),),
    )  # fmt: skip
    groups = [ActivityGroup("idle", "appdb", user, "web", "", 1) for user in ("app", "worker")]
    pgb = PgbSnapshot((), (), (), {}, PgbConfig(), None)
    [finding] = timeouts(settings, PgSnapshot(masked, tuple(groups), None, 0.0, False), pgb)
    assert finding.code == "timeouts_unknown" and finding.subjects == (Subject(("user:app", "db:appdb")),)
    text = finding.sentence()
    assert text.startswith("cannot tell whether") and "for app@appdb:" in text and "worker" not in text
    known = replace(masked, masked=())
    assert timeouts(settings, PgSnapshot(known, tuple(groups), None, 0.0, False), pgb) == []
    unset = replace(masked, statement_timeout_ms=0, masked=())
    [finding] = timeouts(settings, PgSnapshot(unset, tuple(groups), None, 0.0, False), pgb)
    assert finding.code == "timeouts_unset" and "both unset for app@appdb:" in finding.sentence()
