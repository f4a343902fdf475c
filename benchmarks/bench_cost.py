"""What one run of the check costs, each figure beside its target.

- The reference stack (django_db_tools/reference.py, the README's series table): one instance with both
  sections; PostgreSQL with 20 clients (`web` 10 on `shop`, 2 of them active; `celery` 6 on `reports`, 2 of
  them idle in a transaction; `admin` 4 on `billing`), PgBouncer with 3 pools (`shop` and `billing` in
  transaction mode, `reports` in session mode), 2 clients on each. After 3 warm-up runs: the distinct series
  of a run, and from libpq's trace of the check's own connections the round trips to PostgreSQL and the SHOW
  statements sent to PgBouncer in each of 3 runs, and the connections the servers saw the check open.
- PgBouncer side (pgbouncer section only, its defaults) at 10 and 200 pools: series per pool, and the run
  time beside Datadog's own `pgbouncer` check and beside bare `SHOW POOLS` + `SHOW STATS`. Datadog's check is
  not installable from PyPI (the name there holds an empty placeholder): ``OfficialPgbouncerRun`` does what
  its source (integrations-core, pgbouncer/datadog_checks/pgbouncer) does each run: SHOW STATS, POOLS,
  DATABASES and CONFIG, each row's columns submitted through the base class one by one, and SHOW VERSION
  for its metadata, on one kept connection (psycopg 3 with dict rows here, psycopg2's DictCursor there).
- Run time of the PostgreSQL side at 100, 1,000 and 2,000 idle clients beside a bare
  `SELECT count(*) FROM pg_stat_activity` on an open connection. On two cores, where the scheduler puts the
  backends moves a round trip's time by up to a third: each level is measured on 5 sets of new connections
  (the checks' and the bare statement's), and its ratio is the median of theirs, shown with their range.
  At the fewest clients, after them (reported only): the run with nothing decided (``RunFloor``), the check's
  own statement and its last run's submissions to the stub aggregator, on a connection of its own, in turn
  with the bare statement.
- Each time is measured twice: the check with its submissions going nowhere (its own cost), and with the
  datadog stub aggregator (the Agent's submission path in the base class); all of them interleaved in one
  process after warm-up rounds, so that the machine's noise falls on all alike. Medians and p90; ratios of
  medians.
- Peak Python memory of one run (tracemalloc, after a warm-up run) at 10 and 200 pools.
- PgBouncer's clients: at 100 and 5,000 idle client connections of 3 applications, the run time beside the
  bare SHOW statements of a run (POOLS, STATS, CLIENTS, fetched whole), the peak memory of one run, and the
  series, which must not grow with the clients.

Usage: python benchmarks/bench_cost.py [--runs N] [--warmup N] [--clients 100,1000,2000] [--pools 10,200]
       [--pgbouncer-clients 100,5000] [--sets N] [--series]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq
from psycopg.rows import dict_row

os.environ.setdefault("DDEV_SKIP_GENERIC_TAGS_CHECK", "true")

from datadog_checks.base import AgentCheck
from datadog_checks.base.stubs import aggregator

from datadog_checks.django_db import DjangoDbCheck
from django_db_tools.reference import WARM_UP_RUNS, ReferenceStack
from django_db_tools.sandbox import SUPERUSER, SUPERUSER_PASSWORD, Sandbox

# Targets.
REFERENCE_SERIES = 80
SERIES_PER_POOL = 2.0  # at the most pools (200 by default), the defaults' max_tag_values
POSTGRES_RATIO_FIRST = 2.0  # at the fewest idle clients (100 by default)
POSTGRES_RATIO_LAST = 1.3  # at the most (2,000 by default)
CONNECTION_SETS = 5  # sets of new connections each PostgreSQL level is measured on
OFFICIAL_RATIO_LAST = 0.5  # PgBouncer side over Datadog's pgbouncer check, at the most pools
MEMORY_RATIO = 2.0  # the peak at the most pools over the peak at the fewest
POSTGRES_ROUND_TRIPS = 1
# SHOW POOLS, STATS and CLIENTS; and SERVERS where a postgres section beside it has the check tell PgBouncer's
# server connections among PostgreSQL's backends, as on the reference stack.
SHOW_PER_RUN = 4
CLIENTS_RATIO_LAST = 2.0  # the PgBouncer side over its bare SHOW statements, at the most clients (5,000)
CLIENT_APPS = ("web", "celery", "admin")

TRACED_RUNS = 3
IDLE_APPS = ("web",) * 5 + ("celery",) * 3 + ("admin",) * 2


class BenchmarkBroken(RuntimeError):
    """The benchmark can no longer measure what it says: fix the benchmark, not the figures."""


# -- the check, with and without an aggregator ---------------------------------------------------
def _nothing(self: object, *args: object, **kwargs: object) -> None:
    return None


class SilentCheck(DjangoDbCheck):
    """The check with every submission method doing nothing: a run's time is the check's own."""

    gauge = rate = count = monotonic_count = service_check = set_metadata = _nothing


def checks(instance: dict[str, Any]) -> tuple[DjangoDbCheck, DjangoDbCheck]:
    """A silent check and one submitting to the stub aggregator; fails if the silent one submits anything."""
    silent, stub = SilentCheck("django_db", {}, [instance]), DjangoDbCheck("django_db", {}, [instance])
    aggregator.reset()
    silent.check(None)
    leaked = [*aggregator.metric_names, *aggregator.service_check_names, *(str(e) for e in aggregator.events)]
    if leaked:
        raise BenchmarkBroken(f"the check submits past the no-op methods of SilentCheck: {sorted(set(leaked))[:5]}")
    return silent, stub


def stub_run(check: DjangoDbCheck) -> None:
    aggregator.reset()
    check.check(None)


class OfficialPgbouncerRun(AgentCheck):
    """A run of Datadog's own `pgbouncer` check as its source makes it (not installable here: see the module's
    docstring): four SHOW statements on one kept console connection, each row's columns submitted one by one
    with the row's tags, the admin database's rows skipped; then SHOW VERSION for its metadata."""

    STATS_RATES = ("total_requests", "total_xact_count", "total_query_count", "total_received", "total_sent",
                   "total_query_time", "total_xact_time", "total_wait_time")  # fmt: skip
    STATS_GAUGES = ("avg_req", "avg_xact_count", "avg_query_count", "avg_wait_time", "avg_recv", "avg_sent",
                    "avg_query", "avg_xact_time", "avg_query_time")  # fmt: skip
    POOLS_GAUGES = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login",
                    "maxwait", "maxwait_us")  # fmt: skip
    DATABASES_GAUGES = ("pool_size", "max_connections", "current_connections")

    def __init__(self, name: str, init_config: dict[str, Any], instances: list[dict[str, Any]]):
        super().__init__(name, init_config, instances)
        self.conn: psycopg.Connection[Any] | None = None
        rate, gauge = self.rate, self.gauge
        self.scopes = (
            ("SHOW STATS", ("database",), [(c, "pgbouncer.stats." + c, rate) for c in self.STATS_RATES]
             + [(c, "pgbouncer.stats." + c, gauge) for c in self.STATS_GAUGES]),
            ("SHOW POOLS", ("database", "user"), [(c, "pgbouncer.pools." + c, gauge) for c in self.POOLS_GAUGES]),
            ("SHOW DATABASES", ("name",), [(c, "pgbouncer.databases." + c, gauge) for c in self.DATABASES_GAUGES]),
            ("SHOW CONFIG", (), [("max_client_conn", "pgbouncer.max_client_conn", gauge)]),
        )  # fmt: skip

    def check(self, _: Any) -> None:
        instance = self.instance
        if self.conn is None:
            self.conn = psycopg.connect(
                host=instance["host"], port=instance["port"], user=instance["username"],
                password=instance["password"], dbname="pgbouncer", autocommit=True, row_factory=dict_row,
                cursor_factory=psycopg.ClientCursor, prepare_threshold=None,
            )  # fmt: skip
        with self.conn.cursor() as cursor:
            for query, descriptors, metrics in self.scopes:
                cursor.execute(query)  # type: ignore[arg-type]
                for row in cursor:
                    if "key" in row:  # SHOW CONFIG: one setting a row
                        row = {**row, row["key"]: row["value"]}
                    elif row.get("database") == "pgbouncer":
                        continue
                    tags = [f"{d}:{row[d]}" for d in descriptors if d in row]
                    for column, name, submit in metrics:
                        if column in row:
                            submit(name, row[column], tags)
        self.service_check("pgbouncer.can_connect", AgentCheck.OK, tags=["db:pgbouncer"])
        with self.conn.cursor() as cursor:
            cursor.execute("SHOW VERSION")
            cursor.fetchall()

    def cancel(self) -> None:
        if self.conn is not None:
            self.conn.close()


class SilentOfficialRun(OfficialPgbouncerRun):
    gauge = rate = count = monotonic_count = service_check = set_metadata = _nothing


def series() -> set[tuple[str, tuple[str, ...], str, Any]]:
    """Every distinct series the stub aggregator holds: metric name, tags, host, device."""
    return {
        (name, tuple(sorted(m.tags)), m.hostname, m.device)
        for name in aggregator.metric_names
        for m in aggregator.metrics(name)
    }


def counted_connections() -> float:
    return sum(m.value for m in aggregator.metrics("django_db.postgres.connections"))


# -- timing -----------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    action: Callable[[], object]
    before: Callable[[], object] | None = None  # untimed


def interleaved(steps: Sequence[Step], runs: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps taking turns: after ``warmup`` rounds, ``runs`` rounds."""
    times: dict[str, list[float]] = {step.name: [] for step in steps}
    clock = time.perf_counter
    for round_ in range(warmup + runs):
        for step in steps:
            if step.before is not None:
                step.before()
            start = clock()
            step.action()
            elapsed = clock() - start
            if round_ >= warmup:
                times[step.name].append(elapsed)
    return times


def against_bare(
    silent: DjangoDbCheck,
    stub: DjangoDbCheck,
    bare: Callable[[], object],
    runs: int,
    warmup: int,
    floor: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Rounds of the silent check, the bare query and the check with the stub aggregator, interleaved. Where
    ``floor`` (``RunFloor``) is given, then rounds of it and the bare query (``floor`` and ``floor_bare``): apart,
    so that the checks' figures are measured as without it."""
    steps = [
        Step("check", lambda: silent.check(None)),
        Step("bare", bare),
        Step("stub", lambda: stub.check(None), before=aggregator.reset),
    ]
    times = interleaved(steps, runs, warmup)
    if floor is not None:
        apart = interleaved([Step("bare", bare), Step("floor", floor, before=aggregator.reset)], runs, warmup)
        times.update(floor=apart["floor"], floor_bare=apart["bare"])
    return times


class RunFloor:
    """A run of the PostgreSQL side with nothing decided: the check's own statement, with its last parameters, on
    a connection of its own, and what the check's last run submitted, submitted again through the base class to
    the stub aggregator. What a run would cost if the check's evaluation took no time at all."""

    def __init__(self, check: DjangoDbCheck, conn: psycopg.Connection[Any]):
        source = check.postgres
        if source is None or source.settings is None:
            raise BenchmarkBroken("RunFloor reads the statement of a check whose PostgreSQL side has run")
        self.statement = source.activity_sessions_sql if source.settings.version_num >= 140000 else source.activity_sql
        self.params = dict(source.params)
        self.cursor = conn.cursor(binary=True)
        self.submitter = AgentCheck("django_db", {}, [{}])
        submitter = self.submitter
        kinds = {
            aggregator.GAUGE: submitter.gauge,
            aggregator.RATE: submitter.rate,
            aggregator.COUNT: submitter.count,
            aggregator.MONOTONIC_COUNT: submitter.monotonic_count,
        }
        sent = [m for name in aggregator.metric_names for m in aggregator.metrics(name)]
        self.metrics = [(kinds[m.type], m.name, m.value, tuple(m.tags)) for m in sent]
        checks = [c for name in aggregator.service_check_names for c in aggregator.service_checks(name)]
        self.service_checks = [(c.name, c.status, tuple(c.tags), c.message or None) for c in checks]
        if not self.metrics or not self.service_checks:
            raise BenchmarkBroken("RunFloor replays the check's last run with the stub aggregator: it sent nothing")

    def __call__(self) -> None:
        self.cursor.execute(self.statement, self.params, prepare=True).fetchall()
        for submit, name, value, tags in self.metrics:
            submit(name, value, tags)
        for name, status, tags, message in self.service_checks:
            self.submitter.service_check(name, status, tags, message=message)


def report_times(report: Report, label: str, times: dict[str, list[float]], target: float | None) -> None:
    """Two lines of one level: the check beside the bare statements (against ``target``, where it has one),
    and the check with the stub aggregator (reported only)."""
    bare_median = median_ms(times["bare"])
    ratio = median_ms(times["check"]) / bare_median
    report.line(
        f"{label}: run time, no-op aggregator",
        f"{ms(times['check'])} / bare {ms(times['bare'])} = {ratio:.2f}x",
        f"<= {target:g}x" if target else None,
        ratio <= target if target else None,
    )
    report.line(
        f"{label}: run time, stub aggregator",
        f"{ms(times['stub'])} = {median_ms(times['stub']) / bare_median:.2f}x bare",
    )


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def p90_ms(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] * 1000
    return statistics.quantiles(values, n=10, method="inclusive")[-1] * 1000


def ms(values: list[float]) -> str:
    return f"{median_ms(values):.2f} ms (p90 {p90_ms(values):.2f})"


def peak_memory(run: Callable[[], object], before: Callable[[], object] | None = None, samples: int = 3) -> float:
    """Median of the tracemalloc peak of one run, in bytes above what was held before it; after a warm-up run."""
    peaks = []
    tracemalloc.start()
    try:
        run()
        for _ in range(samples):
            if before is not None:
                before()
            gc.collect()
            tracemalloc.reset_peak()
            held = tracemalloc.get_traced_memory()[0]
            run()
            peaks.append(tracemalloc.get_traced_memory()[1] - held)
    finally:
        tracemalloc.stop()
    return statistics.median(peaks)


# -- round trips --------------------------------------------------------------------------------------
def kept_connection(check: DjangoDbCheck, section: str) -> psycopg.Connection[Any]:
    """The connection the check keeps to a server between runs (``check.<section>.conn``)."""
    source = getattr(check, section, None)
    conn = getattr(source, "conn", None)
    if not isinstance(conn, psycopg.Connection) or conn.closed:
        raise BenchmarkBroken(
            f"DjangoDbCheck.{section}.conn is no longer the check's open {section} connection: the round trips"
            " are counted on it; point kept_connection() in benchmarks/bench_cost.py at where the check keeps it now"
        )
    return conn


@contextmanager
def traced(conn: psycopg.Connection[Any]) -> Iterator[list[str]]:
    """libpq's trace of ``conn`` over the block: one line per protocol message, F(rontend) or B(ackend) first."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as handle:
        conn.pgconn.trace(handle.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield lines
        finally:
            conn.pgconn.untrace()  # flushes libpq's buffer into the file
            handle.seek(0)
            lines += handle.read().splitlines()


@dataclass
class Exchanges:
    round_trips: int  # the client sent, then waited for the server's answer
    sync_or_query: int  # Sync and Query messages sent


def exchanges(lines: list[str]) -> Exchanges:
    trips = requests = 0
    previous = ""
    for line in lines:
        fields = line.split("\t", 3)
        if len(fields) < 3 or fields[0] not in ("F", "B"):
            continue  # the rest of a message spread over lines (a query's text)
        if fields[0] == "F" and fields[2] in ("Sync", "Query"):
            requests += 1
        if fields[0] == "B" and previous == "F":
            trips += 1
        previous = fields[0]
    return Exchanges(trips, requests)


def postgres_sessions(probe: psycopg.Connection[Any], application_name: str) -> set[tuple[Any, ...]]:
    """The server's view: (pid, backend_start) of every backend with the check's application_name."""
    query = "SELECT pid, backend_start FROM pg_stat_activity WHERE application_name = %s"
    return set(probe.execute(query, (application_name,)).fetchall())


def pgbouncer_sessions(admin: psycopg.Connection[Any], application_name: str) -> set[tuple[Any, ...]]:
    """The console's view: (addr, port, connect_time) of each console client with the check's application_name."""
    cursor = admin.execute("SHOW CLIENTS")
    columns = [c.name for c in cursor.description or ()]
    wanted = ("database", "application_name", "addr", "port", "connect_time")
    if not set(wanted) <= set(columns):
        raise BenchmarkBroken(f"SHOW CLIENTS lacks one of {wanted}: {columns}")
    at = {name: columns.index(name) for name in wanted}
    return {
        (row[at["addr"]], row[at["port"]], row[at["connect_time"]])
        for row in cursor.fetchall()
        if row[at["database"]] == "pgbouncer" and row[at["application_name"]] == application_name
    }


# -- output -----------------------------------------------------------------------------------------
class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def section(self, title: str) -> None:
        print(f"\n{title}", flush=True)

    def line(self, label: str, value: str, target: str | None = None, ok: bool | None = None) -> None:
        """A figure, its value, its target and PASS or FAIL; a figure without a target is reported only."""
        if ok is None:
            status, target = "-", target or "-"
        else:
            status = "PASS" if ok else "FAIL"
            self.passed += ok
            self.failed += not ok
        print(f"  {label:<47} {value:<66} {target:<8} {status}", flush=True)


# -- servers and clients --------------------------------------------------------------------------------
def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def connect(port: int, dbname: str, user: str, password: str, app: str, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host="127.0.0.1", port=port, dbname=dbname, user=user, password=password, application_name=app,
        autocommit=True, connect_timeout=10, **kwargs,
    )  # fmt: skip


def console(box: Sandbox, app: str) -> psycopg.Connection[Any]:
    """A connection to PgBouncer's admin console, which speaks the simple query protocol only."""
    return connect(
        box.pgbouncer.port, "pgbouncer", Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD, app,
        cursor_factory=psycopg.ClientCursor, prepare_threshold=None,
    )  # fmt: skip


def make_pools(box: Sandbox, count: int) -> None:
    """``count`` aliases of one database in PgBouncer, each with a pool: a client has been through it."""
    names = [f"alias{i:04d}" for i in range(count)]
    added = [name for name in names if name not in box.pgbouncer.databases]
    for name in added:
        box.pgbouncer.databases[name] = f"host=127.0.0.1 port={box.postgres.port} dbname=postgres"
    box.pgbouncer.reload()
    for name in added:
        with connect(box.pgbouncer.port, name, SUPERUSER, SUPERUSER_PASSWORD, "shop-web", prepare_threshold=None) as c:
            c.execute("SELECT 1").fetchall()


def open_idle_clients(box: Sandbox, clients: list[psycopg.Connection[Any]], level: int) -> None:
    """Idle sessions up to ``level``, over the server's socket (no password hashing: 2,000 open quickly)."""
    while len(clients) < level:
        conn = psycopg.connect(
            host=str(box.postgres.socket_dir), port=box.postgres.port, user=SUPERUSER, dbname="postgres",
            application_name=IDLE_APPS[len(clients) % len(IDLE_APPS)], autocommit=True, connect_timeout=10,
        )  # fmt: skip
        clients.append(conn)


def close_all(conns: Sequence[psycopg.Connection[Any] | None]) -> None:
    for conn in conns:
        if conn is not None:
            conn.close()


# -- the measurements ----------------------------------------------------------------------------------
def reference_stack(report: Report, show_series: bool) -> None:
    report.section(
        "Reference stack: PostgreSQL, 20 clients of 3 applications on 3 databases; PgBouncer, 3 pools, 2 clients"
        f" on each; one instance with both sections, after {WARM_UP_RUNS} warm-up runs"
    )
    with Sandbox() as box:
        stack = ReferenceStack(box).open()
        check = DjangoDbCheck("django_db", {}, [box.instance(True)])
        probe = admin = None
        try:
            for _ in range(WARM_UP_RUNS):
                check.check(None)
            stub_run(check)
            found = series()
            counted = counted_connections()
            if counted < 20:
                raise BenchmarkBroken(f"the check counted {counted:.0f} PostgreSQL client connections, 20 are open")
            findings = sum(1 for s in found if s[0] == "django_db.finding")
            pgbouncer = sum(1 for s in found if s[0].startswith("django_db.pgbouncer."))
            report.line(
                "series per run (metric name + tags)",
                f"{len(found)} (PostgreSQL {len(found) - pgbouncer - findings}, PgBouncer {pgbouncer},"
                f" findings {findings}; {counted:.0f} connections counted)",
                f"<= {REFERENCE_SERIES}",
                len(found) <= REFERENCE_SERIES,
            )
            if show_series:
                for name, n in sorted(Counter(s[0] for s in found).items(), key=lambda item: (-item[1], item[0])):
                    print(f"      {n:>4}  {name}")

            probe = connect(box.postgres.port, "postgres", SUPERUSER, SUPERUSER_PASSWORD, "bench-probe")
            admin = console(box, "bench-probe")
            pg_conn, pgb_conn = kept_connection(check, "postgres"), kept_connection(check, "pgbouncer")
            app = pg_conn.info.get_parameters().get("application_name", "")
            pgb_app = pgb_conn.info.get_parameters().get("application_name", "")
            pg_before, pgb_before = postgres_sessions(probe, app), pgbouncer_sessions(admin, pgb_app)
            pg_runs, pgb_runs, reopened = [], [], []
            for _ in range(TRACED_RUNS):
                pg_conn, pgb_conn = kept_connection(check, "postgres"), kept_connection(check, "pgbouncer")
                aggregator.reset()
                with traced(pg_conn) as pg_lines, traced(pgb_conn) as pgb_lines:
                    check.check(None)
                pg_runs.append(exchanges(pg_lines))
                pgb_runs.append(exchanges(pgb_lines))
                for section, conn in (("postgres", pg_conn), ("pgbouncer", pgb_conn)):
                    if kept_connection(check, section) is not conn:
                        reopened.append(section)
            pg_new = len(postgres_sessions(probe, app) - pg_before)
            pgb_new = len(pgbouncer_sessions(admin, pgb_app) - pgb_before)
        finally:
            check.cancel()
            close_all([probe, admin])
            stack.close()

    if any(run.round_trips == 0 for run in pg_runs + pgb_runs):
        raise BenchmarkBroken("libpq's trace of the check's connection shows a run without a round trip")
    where = f"most in {TRACED_RUNS} runs after the warm-up, libpq trace"
    most = max(run.round_trips for run in pg_runs)
    note = "; the check reconnected, some were not traced" if "postgres" in reopened else ""
    report.line(
        "round trips per run to PostgreSQL",
        f"{most} ({where}; {max(run.sync_or_query for run in pg_runs)} Sync/Query sent{note})",
        f"== {POSTGRES_ROUND_TRIPS}",
        most == POSTGRES_ROUND_TRIPS and "postgres" not in reopened,
    )
    shows = max(run.sync_or_query for run in pgb_runs)  # the console takes simple queries only: one per SHOW
    note = "; the check reconnected, some were not traced" if "pgbouncer" in reopened else ""
    report.line(
        "SHOW statements per run to PgBouncer",
        f"{shows} ({where}{note})",
        f"<= {SHOW_PER_RUN}",
        shows <= SHOW_PER_RUN and "pgbouncer" not in reopened,
    )
    report.line(
        f"new PostgreSQL connections in {TRACED_RUNS} runs",
        f"{pg_new} (server's pg_stat_activity: backend pid and start)",
        "0",
        pg_new == 0,
    )
    report.line(
        f"new PgBouncer connections in {TRACED_RUNS} runs",
        f"{pgb_new} (console's SHOW CLIENTS: port and connect time)",
        "0",
        pgb_new == 0,
    )


def pgbouncer_side(report: Report, levels: Sequence[int], runs: int, warmup: int) -> None:
    report.section(
        "PgBouncer side (pgbouncer section only, its defaults): aliases of one database, one pool each;"
        " official = Datadog's pgbouncer check's run (OfficialPgbouncerRun); bare = SHOW POOLS + SHOW STATS"
        " on an open console connection"
    )
    memory: dict[int, tuple[float, float]] = {}
    counts: dict[int, int] = {}
    most = max(levels)
    box = Sandbox(max_connections=most + 50, max_client_conn=most + 100, default_pool_size=5).start()
    made: list[AgentCheck] = []
    bare = None
    try:
        bare = console(box, "bench-bare")
        instance = box.pgbouncer.instance(Sandbox.MONITOR_USER)
        made += checks({"pgbouncer": instance})
        silent, stub = made
        official_instance = {"host": instance["host"], "port": instance["port"], "username": instance["username"],
                             "password": instance["password"]}  # fmt: skip
        # Memory beside the pools, none folded into `other`: the rows are read a few at a time.
        spread = SilentCheck("django_db", {}, [{"pgbouncer": instance, "max_tag_values": most + 50}])
        made.append(spread)
        official = OfficialPgbouncerRun("pgbouncer", {}, [official_instance])
        silent_official = SilentOfficialRun("pgbouncer", {}, [official_instance])
        made += [official, silent_official]
        for level in levels:
            make_pools(box, level)
            pools = sum(1 for row in bare.execute("SHOW POOLS").fetchall() if row[0] != "pgbouncer")
            if pools < level:
                raise BenchmarkBroken(f"PgBouncer shows {pools} pools, {level} were made")
            stub.check(None)
            stub_run(stub)
            counts[level] = len(series())
            last = level == levels[-1] and len(levels) > 1
            marginal = ""
            if level != levels[0]:
                step = (counts[level] - counts[levels[0]]) / (level - levels[0])
                marginal = f"; {step:.2f} a pool more from {levels[0]} pools"
            report.line(
                f"{level} pools: series / pools",
                f"{counts[level] / level:.2f} ({counts[level]} series{marginal})",
                f"<= {SERIES_PER_POOL:g}" if last else None,
                counts[level] / level <= SERIES_PER_POOL if last else None,
            )

            def show_pools_and_stats() -> None:
                assert bare is not None
                bare.execute("SHOW POOLS").fetchall()
                bare.execute("SHOW STATS").fetchall()

            steps = [
                Step("check", lambda: silent.check(None)),
                Step("official", lambda: silent_official.check(None)),
                Step("bare", show_pools_and_stats),
                Step("stub", lambda: stub.check(None), before=aggregator.reset),
                Step("official stub", lambda: official.check(None), before=aggregator.reset),
            ]
            times = interleaved(steps, runs, warmup)
            # The target holds on the Agent's submission path: with submissions going nowhere, Datadog's check
            # is its four SHOW statements and little else (reported for reference).
            for label, ours, theirs, judged in (("no-op", "check", "official", False),
                                                ("stub", "stub", "official stub", last)):  # fmt: skip
                ratio = median_ms(times[ours]) / median_ms(times[theirs])
                report.line(
                    f"{level} pools: run time, {label} aggregator",
                    f"{ms(times[ours])} / official {ms(times[theirs])} = {ratio:.2f}x",
                    f"<= {OFFICIAL_RATIO_LAST:g}x" if judged else None,
                    ratio <= OFFICIAL_RATIO_LAST if judged else None,
                )
            report.line(
                f"{level} pools: bare SHOW POOLS + SHOW STATS",
                f"{ms(times['bare'])}; the check {median_ms(times['check']) / median_ms(times['bare']):.2f}x",
            )
            memory[level] = (peak_memory(lambda: spread.check(None)), peak_memory(lambda: silent.check(None)))
    finally:
        for check in made:
            check.cancel()
        close_all([bare])
        box.close()

    report.section(
        "Peak Python memory of one run (tracemalloc, after a warm-up run; pgbouncer section only, no-op aggregator)"
    )
    first = levels[0]
    for level in levels:
        streamed, folded = memory[level]
        compared = level != first
        ratio = streamed / memory[first][0]
        report.line(
            f"{level} pools: none folded",
            f"{streamed / 1024:.0f} KiB" + (f" = {ratio:.1f}x the {first}-pool peak" if compared else ""),
            f"<= {MEMORY_RATIO:g}x" if compared else None,
            ratio <= MEMORY_RATIO if compared else None,
        )
        report.line(f"{level} pools: defaults (past 50, folded)", f"{folded / 1024:.0f} KiB")


def open_pgbouncer_clients(
    box: Sandbox, clients: list[psycopg.Connection[Any]], level: int, name: Callable[[int], str] | None = None
) -> None:
    """Idle clients of PgBouncer up to ``level``, of three applications or each named ``name(i)`` (PgBouncer
    trusts them: no hashing)."""
    while len(clients) < level:
        i = len(clients)
        app = name(i) if name is not None else CLIENT_APPS[i % len(CLIENT_APPS)]
        clients.append(connect(box.pgbouncer.port, "postgres", SUPERUSER, "", app, prepare_threshold=None))


def hostile_name(i: int) -> str:
    """A distinct application name of 63 bytes with regex metacharacters, a comma and a colon."""
    return f"{i:05d}-(a+)+$[x]{{2}}|.*?,tag:value-".ljust(63, "z")[:63]


def pgbouncer_clients_side(report: Report, levels: Sequence[int], runs: int, warmup: int) -> None:
    report.section(
        "PgBouncer's clients (pgbouncer section only): idle clients of 3 applications on one pool;"
        " bare = SHOW POOLS, STATS and CLIENTS, fetched whole, on an open console connection"
    )
    most = max(levels)
    box = Sandbox(max_client_conn=most + 100, default_pool_size=5, auth_type="trust").start()
    clients: list[psycopg.Connection[Any]] = []
    made: list[DjangoDbCheck] = []
    bare = None
    counted: dict[int, int] = {}
    try:
        bare = console(box, "bench-bare")
        made += checks({"pgbouncer": box.pgbouncer.instance(Sandbox.MONITOR_USER)})
        silent, stub = made
        for level in levels:
            open_pgbouncer_clients(box, clients, level)
            stub.check(None)
            stub_run(stub)
            seen = sum(m.value for m in aggregator.metrics("django_db.pgbouncer.client_connections"))
            if seen < level:
                raise BenchmarkBroken(f"the check counted {seen:.0f} PgBouncer clients, {level} are open")
            # Findings aside: at 5,000 clients of max_client_conn 5,100 the utilisation finding is rightly on.
            every = series()
            findings = sum(1 for s in every if s[0] == "django_db.finding")
            counted[level] = len(every) - findings
            report.line(
                f"{level} clients: series",
                f"{counted[level]} ({seen:.0f} clients counted; {findings} django_db.finding apart)",
                f"== {counted[levels[0]]}" if level != levels[0] else None,
                counted[level] == counted[levels[0]] if level != levels[0] else None,
            )

            def show_statements() -> None:
                assert bare is not None
                for what in ("POOLS", "STATS", "CLIENTS"):
                    bare.execute("SHOW " + what).fetchall()

            times = against_bare(silent, stub, show_statements, runs, warmup)
            last = level == levels[-1] and len(levels) > 1
            report_times(report, f"{level} clients", times, CLIENTS_RATIO_LAST if last else None)
            quiet = peak_memory(lambda: silent.check(None))
            report.line(f"{level} clients: peak memory, no-op aggregator", f"{quiet / 1024:.0f} KiB")

        # As many clients, each with its own hostile application_name: the series stay within max_tag_values.
        close_all(clients)
        clients.clear()
        open_pgbouncer_clients(box, clients, most, hostile_name)
        stub_run(stub)
        apps = {t for m in aggregator.metrics("django_db.pgbouncer.client_connections") for t in m.tags if
                t.startswith("app:")}  # fmt: skip
        bound = 50 + 1  # max_tag_values and other
        report.line(
            f"{most} distinct names: app values, series",
            f"{len(apps)} app values, {len(series())} series",
            f"<= {bound}",
            len(apps) <= bound,
        )
        times = against_bare(silent, stub, show_statements, runs, warmup)
        ratio = median_ms(times["check"]) / median_ms(times["bare"])
        report.line(
            f"{most} distinct names: run time, no-op aggregator",
            f"{ms(times['check'])} / bare {ms(times['bare'])} = {ratio:.2f}x",
        )
        quiet = peak_memory(lambda: silent.check(None))
        report.line(f"{most} distinct names: peak memory, no-op aggregator", f"{quiet / 1024:.0f} KiB")
    finally:
        for check in made:
            check.cancel()
        close_all([bare, *clients])
        box.close()


def postgres_side(report: Report, levels: Sequence[int], runs: int, warmup: int, sets: int = CONNECTION_SETS) -> None:
    report.section(
        "PostgreSQL side (postgres section only): idle clients of 3 applications;"
        " bare = SELECT count(*) FROM pg_stat_activity on an open connection; each level on"
        f" {sets} sets of new connections (the two checks' and the bare statement's), the ratio their median"
    )
    box = Sandbox(max_connections=max(levels) + 50).start(with_pgbouncer=False)
    clients: list[psycopg.Connection[Any]] = []
    made: list[DjangoDbCheck] = []
    bare = floor_conn = None
    try:
        made += checks(box.instance(False))
        silent, stub = made
        for i, level in enumerate(levels):
            open_idle_clients(box, clients, level)
            measured = []
            for _ in range(sets):
                # New backends: where the scheduler puts them moves a round trip's time by up to a third.
                for check in made:
                    check.cancel()  # its next run connects again
                close_all([bare, floor_conn])
                bare, floor_conn = (
                    connect(box.postgres.port, "postgres", Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD, name)
                    for name in ("bench-bare", "bench-floor")
                )
                stub_run(stub)
                if counted_connections() < level:
                    raise BenchmarkBroken(f"the check counted {counted_connections():.0f} connections, {level} open")
                floor = RunFloor(stub, floor_conn) if i == 0 else None  # at the fewest clients, where it tells

                def count_sessions(conn: psycopg.Connection[Any] = bare) -> None:
                    conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()

                measured.append(against_bare(silent, stub, count_sessions, runs, warmup, floor))
            target = POSTGRES_RATIO_FIRST if i == 0 else POSTGRES_RATIO_LAST if i == len(levels) - 1 else None
            report_sets(report, f"{level} idle clients", measured, target)
    finally:
        for check in made:
            check.cancel()
        close_all([bare, floor_conn, *clients])
        box.close()


def report_sets(report: Report, label: str, measured: list[dict[str, list[float]]], target: float | None) -> None:
    """Two lines of one level measured on several sets of connections, both against ``target``: the median of
    the sets' ratios (each a ratio of medians), and their range. Where ``RunFloor`` was measured, a third line,
    reported only."""
    names = ("check", "bare", "stub", *(("floor", "floor_bare") if "floor" in measured[0] else ()))
    every = {name: [t for times in measured for t in times[name]] for name in names}
    for name, against, title, shown, judged in (
        ("check", "bare", "run time, no-op aggregator", "/ bare " + ms(every["bare"]) + " ", True),
        ("stub", "bare", "run time, stub aggregator", "", True),
        ("floor", "floor_bare", "its statement and submissions alone, stub aggregator", "", False),
    ):
        if name not in every:
            continue
        ratios = sorted(median_ms(times[name]) / median_ms(times[against]) for times in measured)
        ratio = statistics.median(ratios)
        report.line(
            f"{label}: {title}",
            f"{ms(every[name])} {shown}= {ratio:.2f}x ({ratios[0]:.2f}x to {ratios[-1]:.2f}x)",
            f"<= {target:g}x" if target and judged else None,
            ratio <= target if target and judged else None,
        )


def levels_of(text: str) -> list[int]:
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(f"levels are positive whole numbers, comma-separated: {text!r}")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="interleaved rounds per level (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds before them (default 5)")
    parser.add_argument("--clients", type=levels_of, default=[100, 1000, 2000], help="idle PostgreSQL clients")
    parser.add_argument("--pools", type=levels_of, default=[10, 200], help="PgBouncer pools")
    parser.add_argument(
        "--pgbouncer-clients", type=levels_of, default=[100, 5000], help="idle clients of PgBouncer (default 100,5000)"
    )
    parser.add_argument(
        "--sets", type=int, default=CONNECTION_SETS, help="sets of new connections per PostgreSQL level (default 5)"
    )
    parser.add_argument("--series", action="store_true", help="list the reference stack's series by metric name")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.sets < 1:
        parser.error("--runs and --sets must be 1 or more, --warmup 0 or more")
    raise_open_files(max(args.clients) + max(args.pools) + 2 * max(args.pgbouncer_clients) + 500)

    started = time.monotonic()
    print(
        f"django_db cost: {args.runs} interleaved rounds per level (check with a no-op aggregator, bare query,"
        f" check with the stub aggregator) after {args.warmup} warm-up rounds; times are median (p90)"
    )
    report = Report()
    reference_stack(report, args.series)
    pgbouncer_side(report, args.pools, args.runs, args.warmup)
    pgbouncer_clients_side(report, args.pgbouncer_clients, args.runs, args.warmup)
    postgres_side(report, args.clients, args.runs, args.warmup, args.sets)
    print(f"\n{report.passed} of {report.passed + report.failed} figures meet their target")
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
