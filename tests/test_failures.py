"""Every failure a real server gives has a name and advice: none comes out as `unknown`."""

from __future__ import annotations

from datadog_checks.base import AgentCheck

from django_db_tools.sandbox import Sandbox

from .conftest import APP_PASSWORD, run_new_check


def run_once(aggregator, dd_run_check, instance: dict, service_check: str) -> tuple[str, list[str], int]:
    """One run: the can_connect message, the signatures counted in django_db.errors, connection_health."""
    run_new_check(aggregator, dd_run_check, instance)
    aggregator.assert_service_check(service_check, AgentCheck.CRITICAL)
    message = aggregator.service_checks(service_check)[0].message
    signatures = [t for m in aggregator.metrics("django_db.errors") for t in m.tags if t.startswith("signature:")]
    health = aggregator.service_checks("django_db.connection_health")[-1].status
    return message, signatures, health


def test_sslmode_require_against_a_server_without_ssl(aggregator, dd_run_check, sandbox: Sandbox):
    postgres = {**sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD), "sslmode": "require"}
    message, signatures, health = run_once(
        aggregator, dd_run_check, {"postgres": postgres}, "django_db.postgres.can_connect"
    )
    assert ": ssl_unavailable: " in message and "turn ssl on" in message, message
    assert signatures == ["signature:ssl_unavailable"]
    assert health == AgentCheck.CRITICAL


def test_sslmode_require_against_pgbouncer_without_tls(aggregator, dd_run_check, sandbox: Sandbox):
    pgbouncer = {**sandbox.pgbouncer.instance(), "sslmode": "require"}
    message, signatures, _ = run_once(
        aggregator, dd_run_check, {"pgbouncer": pgbouncer}, "django_db.pgbouncer.can_connect"
    )
    assert ": ssl_unavailable: " in message and "client_tls_sslmode" in message, message
    assert signatures == ["signature:ssl_unavailable"]


def test_a_pgbouncer_user_missing_from_stats_users(aggregator, dd_run_check, sandbox: Sandbox):
    # `app` is in the auth file with the right password, but in neither stats_users nor admin_users.
    assert "app" not in str(sandbox.pgbouncer.settings["stats_users"]).split(",")
    pgbouncer = sandbox.pgbouncer.instance("app", APP_PASSWORD)
    message, signatures, health = run_once(
        aggregator, dd_run_check, {"pgbouncer": pgbouncer}, "django_db.pgbouncer.can_connect"
    )
    assert ": console_not_allowed: " in message and "stats_users" in message and "reload" in message, message
    assert APP_PASSWORD not in message
    assert signatures == ["signature:console_not_allowed"]
    assert health == AgentCheck.CRITICAL
