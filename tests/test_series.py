"""What a run costs: distinct series (metric name and tag values), each billed as a custom metric.

Counted on the reference stack (django_db_tools/reference.py), settled before the check runs: what is
counted are connections and clients that hold their state for as long as the test lasts (idle, idle in a
transaction, running a one-hour query). The README's table gives the figures below.
"""

from __future__ import annotations

import os
import re
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import METRIC_GROUPS
from django_db_tools.reference import DIRECT, POOLED, WARM_UP_RUNS, ReferenceStack
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox

from .conftest import metric_values

os.environ.setdefault("DDEV_SKIP_GENERIC_TAGS_CHECK", "true")

README = Path(__file__).resolve().parents[1] / "README.md"
MANY = 40
SERVER_FIGURES = ("max_connections", "reserved_connections", "connections_available", "connection_utilization")
P, B = "django_db.postgres.", "django_db.pgbouncer."


@pytest.fixture(scope="module")
def stack() -> Iterator[Sandbox]:
    with Sandbox(max_connections=150, max_client_conn=200, default_pool_size=2) as box:
        reference = ReferenceStack(box).open()
        yield box
        reference.close()


def series(aggregator, prefix: str = "") -> set[tuple[str, tuple[str, ...]]]:
    return {
        (name, tuple(sorted(m.tags)))
        for name in aggregator.metric_names
        if name.startswith(prefix)
        for m in aggregator.metrics(name)
    }


def after_warm_up(aggregator, instance: dict) -> set[tuple[str, tuple[str, ...]]]:
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        for _ in range(WARM_UP_RUNS):
            check.check(None)
        aggregator.reset()
        check.check(None)
        return series(aggregator)
    finally:
        check.cancel()


def readme_count() -> int:
    match = re.search(r"The reference stack .*? sends \*\*(\d+)\*\* series", README.read_text(), re.S)
    assert match, "the README's series table names the reference stack's count"
    return int(match.group(1))


def test_the_reference_stack_sends_what_the_readme_says(aggregator, stack):
    found = after_warm_up(aggregator, stack.instance())
    by_name = Counter(name for name, _ in found)
    databases = len(DIRECT)  # one application on each, directly and through PgBouncer
    pools = len(POOLED)
    expected = {
        # PostgreSQL: 4 a server; a series per (db, user, app, state) and pooler: web idle and active, celery idle
        # and idle in a transaction, admin idle, and each pool's idle server connection (pooler:pgbouncer).
        **dict.fromkeys((P + n for n in SERVER_FIGURES), 1),
        P + "connections": 5 + pools,
        "db.client.connections.usage": 5,  # used and idle on shop and reports, idle on billing
        # Ages while not zero: every (db, app) has an idle connection; one has a transaction left idle, one an
        # active query. No leak, no lock wait: not sent.
        P + "idle.max_age": databases,
        P + "idle_in_transaction.max_age": 1,
        P + "active.max_duration": 1,
        # PgBouncer: 3 a server, 3 a pool and 2 a database; server_utilization only where a server is active
        # (the session pool's clients hold theirs), a series per (pgbouncer_db, user, app, state) of clients.
        **dict.fromkeys((B + n for n in ("max_client_conn", "clients", "client_utilization")), 1),
        **dict.fromkeys((B + "pools." + n for n in ("cl_active", "sv_active", "sv_idle")), pools),
        B + "stats.transactions": pools,
        B + "stats.wait_time": pools,
        B + "pools.server_utilization": 1,
        B + "client_connections": pools,
        # Each role without statement_timeout on its database.
        "django_db.finding": databases,
    }
    print(f"\n{len(found)} series: {dict(sorted(by_name.items()))}")
    assert dict(by_name) == expected
    assert len(found) == sum(expected.values()) == readme_count() <= 80
    findings = {tags for name, tags in found if name == "django_db.finding"}
    assert {next(t for t in tags if t.startswith("finding:")) for tags in findings} == {"finding:timeouts_unset"}


def test_a_gauge_zero_on_a_healthy_stack_is_sent_while_it_lasts_then_once_as_zero(aggregator, sandbox, clients):
    """leaked_connections: sent while a leak lasts, once as 0 on the run it ends, then no more."""
    leaky = clients.connect(app="series-leaky")
    leaky.execute("SELECT 1")
    time.sleep(1.1)
    check = DjangoDbCheck("django_db", {}, [{"postgres": sandbox.instance()["postgres"], "leak_idle_seconds": 1}])
    sent = []
    try:
        for step in range(3):
            if step == 1:
                leaky.close()
            aggregator.reset()
            check.check(None)
            sent.append(metric_values(aggregator, P + "leaked_connections", "app:series-leaky"))
    finally:
        check.cancel()
    assert sent == [[1], [0], []]


def test_a_cumulative_counter_is_sent_first_then_each_time_it_moves(aggregator, sandbox, clients):
    """sessions.opened, a monotonic_count: the Agent counts the difference from the last value sent."""
    check = DjangoDbCheck("django_db", {}, [{"postgres": sandbox.instance()["postgres"]}])
    sent = []
    try:
        for step in range(3):
            if step == 2:
                clients.connect(app="series-new").execute("SELECT 1")
            aggregator.reset()
            check.check(None)
            sent.append(metric_values(aggregator, P + "sessions.opened", "db:appdb"))
    finally:
        check.cancel()
    first, unchanged, moved = sent
    assert len(first) == 1 and unchanged == [] and moved == [first[0] + 1]


def test_every_group_adds_series_only_when_asked_for(aggregator, stack):
    counts = {}
    for extra in ([], list(METRIC_GROUPS)):
        check = DjangoDbCheck("django_db", {}, [{**stack.instance(), "extra_metrics": extra}])
        aggregator.reset()
        check.check(None)
        check.cancel()
        counts[len(extra)] = {name for name, _ in series(aggregator)}
    added = counts[len(METRIC_GROUPS)] - counts[0]
    assert {"django_db.connections.usage", B + "lists.pools", B + "stats.queries", B + "pools.sv_login",
            B + "databases.pool_size", B + "databases.current_connections"} <= added  # fmt: skip
    assert counts[0] <= counts[len(METRIC_GROUPS)]


def test_current_opentelemetry_names_add_what_the_readme_says(aggregator, stack):
    """`otel_semconv`: 3 series for PostgreSQL, one pool of the whole server (used, idle, max) and 4 per PgBouncer
    pool without a minimum (used, idle, max, pending_requests) under the current names; legacy sends none of
    them, both adds them."""
    found = {option: after_warm_up(aggregator, {**stack.instance(), "otel_semconv": option})
             for option in ("legacy", "current", "both")}  # fmt: skip
    legacy, current, both = found["legacy"], found["current"], found["both"]
    new = {s for s in both if s[0].startswith("db.client.connection.")}
    usage = {s for s in legacy if s[0] == "db.client.connections.usage"}
    print(f"\nseries: legacy {len(legacy)}, current {len(current)}, both {len(both)}")
    assert usage and both == legacy | new and current == (legacy - usage) | new
    assert len(new) == 3 + 4 * len(POOLED)


def _peak_memory(check: DjangoDbCheck) -> int:
    """Bytes of Python memory a run takes at its peak, metrics handed to a no-op as the Agent would take them."""
    check.check(None)  # warm: the connection and what is read on connecting
    tracemalloc.start()
    try:
        check.check(None)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_five_series_a_pgbouncer_pool_and_memory_that_does_not_grow_with_them(aggregator, stack):
    def noop(*args: object) -> None:
        pass

    instance = {"pgbouncer": stack.pgbouncer.instance(Sandbox.MONITOR_USER)}
    few = DjangoDbCheck("django_db", {}, [instance])
    few._submitters = dict.fromkeys(few._submitters, noop)
    peak_few = _peak_memory(few)
    few.cancel()
    names = [f"alias{i:03d}" for i in range(MANY)]
    for name in names:
        stack.pgbouncer.databases[name] = f"host=127.0.0.1 port={stack.postgres.port} dbname=postgres"
    stack.pgbouncer.reload()
    try:
        for name in names:
            with psycopg.connect(
                host="127.0.0.1", port=stack.pgbouncer.port, user=SUPERUSER, password=SUPERUSER_PASSWORD,
                dbname=name, autocommit=True, prepare_threshold=None, connect_timeout=5,
            ) as conn:  # fmt: skip
                conn.execute("SELECT 1")
        check = DjangoDbCheck("django_db", {}, [instance])
        aggregator.reset()
        check.check(None)
        found = {s for s in series(aggregator, B) if any(t in s[1] for t in (f"pgbouncer_db:{n}" for n in names))}
        check._submitters = dict.fromkeys(check._submitters, noop)
        peak_many = _peak_memory(check)
        check.cancel()
    finally:
        for name in names:
            del stack.pgbouncer.databases[name]
        stack.pgbouncer.reload()
    print(f"\n{len(found)} series for {MANY} idle pools; peak memory {peak_few / 1024:.1f} KiB, {peak_many / 1024:.1f}")
    # Each idle pool (its server connection idle, no client): cl_active, sv_active, sv_idle, and its database's
    # transactions and wait_time rates; what is zero there (waiting clients, maxwait, utilisation) is not sent.
    assert Counter(name for name, _ in found) == dict.fromkeys(
        (B + "pools.cl_active", B + "pools.sv_active", B + "pools.sv_idle", B + "stats.transactions",
         B + "stats.wait_time"), MANY)  # fmt: skip
    # The console's rows are read a few at a time and each metric is submitted as it is made.
    assert peak_many <= 2 * peak_few
