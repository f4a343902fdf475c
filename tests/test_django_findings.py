"""Findings about real Django applications under gunicorn: what the operator reads in connection_health."""

from __future__ import annotations

import threading

from datadog_checks.base import AgentCheck

from .conftest import health, wait_for


def test_four_sessions_idle_in_transaction_are_one_finding(aggregator, dd_run_check, webapps, sandbox):
    app = webapps(app_name="stuck-web", threads=4)
    holders = [threading.Thread(target=app.get, args=("/transaction/?seconds=4",)) for _ in range(4)]
    for holder in holders:
        holder.start()
    try:
        wait_for(sandbox, "stuck-web", 4, "idle in transaction")
        threading.Event().wait(1.1)
        instance = {
            "postgres": sandbox.postgres.instance("datadog", "datadog-secret"),
            "applications": {"include": ["^stuck-web$"]},
            "thresholds": {"idle_in_transaction_seconds": {"warning": 1}},
        }
        status, text = health(aggregator, dd_run_check, instance)
    finally:
        for holder in holders:
            holder.join()
    assert status == AgentCheck.WARNING
    assert "WARNING: 4 connections idle in transaction (app=stuck-web 4), the oldest for " in text
    assert text.count("idle in transaction") == 1, text
