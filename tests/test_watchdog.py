"""The watchdog serves every instance of the process: nothing one asks of it may stop it."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.connection import _WATCHDOG, ClientTimeout, deadline


def test_a_deadline_past_what_a_thread_can_wait_leaves_other_instances_bounded(aggregator, dd_run_check, sandbox):
    # A frozen PgBouncer behind a console connection the check already holds.
    instance = {"pgbouncer": {**sandbox.pgbouncer.instance("datadog"), "query_timeout": 1, "connect_timeout": 2}}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    aggregator.assert_service_check("django_db.pgbouncer.can_connect", AgentCheck.OK)

    # Another connection in the process arms a deadline of 1e10 s (more than a thread can wait for)
    # and keeps it armed while the watchdog takes it up.
    other = psycopg.connect(sandbox.postgres.dsn(), autocommit=True)
    try:
        with deadline(other, 1e10):
            other.execute("SELECT 1")
            time.sleep(0.3)
        with deadline(other, float("nan")):
            other.execute("SELECT 1")
            time.sleep(0.3)
    finally:
        other.close()
    assert _WATCHDOG._thread is not None and _WATCHDOG._thread.is_alive()

    aggregator.reset()
    sandbox.pgbouncer.pause()
    try:
        run = threading.Thread(target=check.run, daemon=True)
        run.start()
        run.join(timeout=20)
        assert not run.is_alive(), "the run against the frozen PgBouncer hung"
    finally:
        sandbox.pgbouncer.resume()
    [status] = aggregator.service_checks("django_db.pgbouncer.can_connect")
    assert status.status == AgentCheck.CRITICAL and "timeout" in status.message
    check.cancel()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread ended on purpose
def test_a_watchdog_thread_that_ended_is_started_again(sandbox, monkeypatch):
    conn = psycopg.connect(sandbox.postgres.dsn(), autocommit=True)
    try:
        with deadline(conn, 5):
            conn.execute("SELECT 1")

        def end_the_thread() -> None:
            raise SystemExit  # ends the thread, as no ordinary error can

        monkeypatch.setattr(_WATCHDOG, "_step", end_the_thread)
        with _WATCHDOG._cond:
            _WATCHDOG._cond.notify()
        assert _WATCHDOG._thread is not None
        _WATCHDOG._thread.join(timeout=10)
        assert not _WATCHDOG._thread.is_alive()
        monkeypatch.undo()

        with pytest.raises(ClientTimeout), deadline(conn, 0.5):
            conn.execute("SELECT pg_sleep(5)")
        assert _WATCHDOG._thread.is_alive()
    finally:
        conn.close()


def test_a_deadline_shorter_than_one_already_armed_still_cuts_its_query_off(sandbox):
    # The thread only wakes for a deadline earlier than the one it waits for: it must wake for this one.
    first = psycopg.connect(sandbox.postgres.dsn(), autocommit=True)
    second = psycopg.connect(sandbox.postgres.dsn(), autocommit=True)
    try:
        with deadline(first, 30):
            first.execute("SELECT 1")
            time.sleep(0.2)  # the thread now waits for the 30 s deadline
            started = time.monotonic()
            with pytest.raises(ClientTimeout), deadline(second, 0.5):
                second.execute("SELECT pg_sleep(5)")
            assert time.monotonic() - started < 3
            assert first.execute("SELECT 2").fetchone() == (2,)  # the other connection is left alone
    finally:
        first.close()
        second.close()
