"""The demo: a throwaway PostgreSQL and PgBouncer, the shop served by worker threads, and four phases.

1. healthy     a few clients browse and order; connections are reused and come back.
2. leak        report threads started by a view keep their connections (CONN_MAX_AGE=None) for ever.
3. stuck       a checkout holds its transaction open while it waits on a payment call; others queue on its lock.
4. saturation  more concurrent requests than the PgBouncer pool and max_client_conn allow.

Every few seconds DjangoDbCheck runs against the sandbox and a few lines show what it saw.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

import psycopg

from .. import sandbox as sandbox_module
from . import live, shop
from .server import PooledWSGIServer, WorkerPool
from .state import STATE

SHOP_USER = "shop"
SHOP_PASSWORD = "shop-demo-secret"  # noqa: S105 - a throwaway local server
WORKERS = 48  # threads serving requests, like gunicorn --threads
REPORT_THREADS = 10
DASHBOARD_CLIENTS = 36
PG_MAX_CONNECTIONS = 20
POOL_SIZE = 5
REPORTS_POOL_SIZE = REPORT_THREADS
REPORTS_BUDGET = 4  # the report jobs the runbook plans for: a few at a time
MAX_CLIENT_CONN = 30
HTTP_TIMEOUT = 20.0
RETRY_SECONDS = 0.2


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


@dataclass
class Phase:
    name: str
    what: str
    start: Callable[[], None]
    stop: Callable[[], None]
    expect: str = ""  # what the live view should show, said before it does
    advice: str = ""  # what to do when the check reports this in production


RANK = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}
FINDING = re.compile(r"^(OK|WARNING|CRITICAL|UNKNOWN): (.*)$", re.S)
FIGURE = re.compile(r"\d+(?:\.\d+)?")
SUMMARY_FINDINGS = 4


class Traffic:
    """``clients`` threads sending requests until stopped, counting the answers."""

    def __init__(
        self,
        base: str,
        name: str,
        clients: int,
        pick: Callable[[random.Random], tuple[str, str]],
        think: float = 0.0,
        once: bool = False,
    ):
        self.base = base
        self.once = once
        self.name = name
        self.clients = clients
        self.pick = pick
        self.think = think
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failed = 0
        self.reasons: dict[str, int] = {}
        self.threads: list[threading.Thread] = []
        self._shown = (0, 0)

    def start(self) -> Traffic:
        for number in range(self.clients):
            thread = threading.Thread(target=self._loop, args=(number,), name=f"{self.name}-client-{number + 1}")
            self.threads.append(thread)
            thread.start()
        return self

    def _loop(self, number: int) -> None:
        rng = random.Random(number)  # noqa: S311 - traffic, not secrets
        while True:
            method, path = self.pick(rng)
            reason = None
            try:
                data = b"" if method == "POST" else None
                request = urllib.request.Request(self.base + path, method=method, data=data)  # noqa: S310
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:  # noqa: S310 - our server
                    response.read()
            except urllib.error.HTTPError as e:
                reason = f"HTTP {e.code}"
            except (OSError, ValueError) as e:
                reason = type(e).__name__
            with self.lock:
                if reason is None:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if self.once or self.stopped.is_set():
                return
            pause = self.think if reason is None else max(self.think, RETRY_SECONDS)  # clients back off on errors
            if pause:
                self.stopped.wait(pause * (0.5 + rng.random()))

    def stop(self) -> None:
        self.stopped.set()

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float = HTTP_TIMEOUT + 5) -> list[str]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        return [thread.name for thread in self.threads if thread.is_alive()]

    def since_last(self) -> str:
        with self.lock:
            ok, failed = self.ok - self._shown[0], self.failed - self._shown[1]
            self._shown = (self.ok, self.failed)
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        text = f"{self.name} ok {ok} failed {failed}"
        return text + (f" (so far: {reasons})" if failed and reasons else "")


class Demo:
    def __init__(self, phase_seconds: float, interval: float, out: TextIO):
        self.phase_seconds = phase_seconds
        self.interval = interval
        self.out = out
        self.leak_idle_seconds = max(1.0, min(5.0, round(phase_seconds / 3, 1)))
        self.started = time.monotonic()
        self.sandbox: sandbox_module.Sandbox | None = None
        self.server: PooledWSGIServer | None = None
        self.server_thread: threading.Thread | None = None
        self.pool: WorkerPool | None = None
        self.traffic: list[Traffic] = []
        self.helpers: list[threading.Thread] = []
        self.check: Any = None
        self.exporter: Any = None  # the shop's own counters, as django-prometheus exports them
        self.base = ""
        self.server_idle_timeout = max(1, int(self.leak_idle_seconds) - 1)
        # phase name: finding with its figures blanked out: (status, the finding as last seen)
        self.found: dict[str, dict[str, tuple[str, str]]] = {}
        self.explained: set[str] = set()

    # -- output ---------------------------------------------------------------------------------
    def say(self, *lines: str) -> None:
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()

    def clock(self) -> str:
        return f"[{time.monotonic() - self.started:5.1f}s]"

    # -- set-up ---------------------------------------------------------------------------------
    def start(self) -> None:
        # Missing binaries are found before any temporary folder is made.
        sandbox_module.pg_bindir()
        sandbox_module.pgbouncer_binary()
        box = sandbox_module.Sandbox(
            max_connections=PG_MAX_CONNECTIONS,
            pool_mode="transaction",
            default_pool_size=POOL_SIZE,
            reserve_pool_size=0,
            max_client_conn=MAX_CLIENT_CONN,
            server_round_robin=1,  # use pooled server connections in turn, so none sits idle for long
            server_idle_timeout=self.server_idle_timeout,  # closes idle pooled server connections
            query_wait_timeout=10,
        )
        self.sandbox = box
        self.say(f"sandbox: {box.root}")
        pg = box.postgres.port
        box.pgbouncer.users[SHOP_USER] = SHOP_PASSWORD
        box.pgbouncer.databases.update(
            {
                "shop": f"host=127.0.0.1 port={pg} dbname=shop",
                "shop_reports": f"host=127.0.0.1 port={pg} dbname=shop pool_mode=session pool_size={REPORTS_POOL_SIZE}",
            }
        )
        box.start()
        box.psql(f"CREATE ROLE {SHOP_USER} LOGIN PASSWORD '{SHOP_PASSWORD}'")
        box.psql(f"CREATE DATABASE shop OWNER {SHOP_USER}")
        self.say(
            f"PostgreSQL 127.0.0.1:{pg} (max_connections {PG_MAX_CONNECTIONS}), "
            f"PgBouncer 127.0.0.1:{box.pgbouncer.port} (transaction pool of {POOL_SIZE}, "
            f"session pool `shop_reports` of {REPORTS_POOL_SIZE}, max_client_conn {MAX_CLIENT_CONN})"
        )

        pgb = box.pgbouncer.port
        shop.configure(
            {
                "default": shop.database("127.0.0.1", pgb, "shop", SHOP_USER, SHOP_PASSWORD, shop.WEB_APP, 60),
                "reports": shop.database(
                    "127.0.0.1", pgb, "shop_reports", SHOP_USER, SHOP_PASSWORD, shop.REPORTS_APP, None
                ),
            }
        )
        shop.create_tables()
        self.pool = WorkerPool(WORKERS, "web", on_exit=shop.close_connections)
        self.server = PooledWSGIServer(("127.0.0.1", 0), shop.wsgi_application(), self.pool)
        self.server_thread = self.server.serve_in_thread()
        self.base = f"http://127.0.0.1:{self.server.port}"
        self.say(
            f"Django shop on {self.base} ({WORKERS} worker threads; CONN_MAX_AGE=60 for `default`, "
            f"None for `reports`; application_name {shop.WEB_APP} and {shop.REPORTS_APP})"
        )

        from prometheus_client import start_http_server

        from datadog_checks.django_db import DjangoDbCheck

        metrics_port = sandbox_module.free_port()
        self.exporter = start_http_server(metrics_port, addr="127.0.0.1")
        self.say(f"the shop's own counters (django-prometheus) on http://127.0.0.1:{metrics_port}/metrics")
        instance = box.instance()
        instance.update(
            django_metrics=[{"url": f"http://127.0.0.1:{metrics_port}/metrics", "app": shop.WEB_APP, "timeout": 2}],
            conn_max_age=shop.WEB_CONN_MAX_AGE,
            leak_idle_seconds=self.leak_idle_seconds,
            log_files=[str(box.pgbouncer.logfile), str(box.postgres.logfile)],
            # The runbook's connection math: the web views share the transaction pool; a few report jobs.
            # The web's threads keep their connections for CONN_MAX_AGE on purpose: its leak threshold follows
            # that, not the demo's short leak_idle_seconds, which the report jobs' leak is shown with.
            apps=[
                {"match": f"^{shop.WEB_APP}$", "max_connections": POOL_SIZE, "conn_max_age": shop.WEB_CONN_MAX_AGE},
                {"match": f"^{shop.REPORTS_APP}$", "max_connections": REPORTS_BUDGET},
            ],
            thresholds={
                "idle_in_transaction_seconds": {"warning": 2, "critical": max(3, round(self.phase_seconds / 2))},
                "pgbouncer_maxwait_seconds": {"warning": 0.5, "critical": 2},
                "leaked_connections": {"warning": 1},
            },
        )
        self.check = DjangoDbCheck("django_db", {}, [instance])
        self.say(
            f"check: every {self.interval:g} s, leak_idle_seconds {self.leak_idle_seconds:g}, "
            f"phases of {self.phase_seconds:g} s",
            f"budgets (apps): {shop.WEB_APP} {POOL_SIZE} connections (the transaction pool), "
            f"{shop.REPORTS_APP} {REPORTS_BUDGET} (a few report jobs at a time)",
        )

    # -- phases ---------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        return [
            Phase(
                "healthy",
                "3 clients browse products and place orders; connections are reused and handed back",
                self.start_healthy,
                lambda: None,
                expect="a few shop-web connections, idle between requests and reused; health OK.",
                advice="nothing: this is what a healthy stack looks like.",
            ),
            Phase(
                "leak",
                f"a view starts {REPORT_THREADS} report threads that never call close_old_connections(); "
                "with CONN_MAX_AGE=None their connections stay open, each pinning a session-pool server connection",
                self.start_leak,
                self.stop_leak,
                expect=f"{REPORT_THREADS} shop-reports connections that stay idle; once idle for longer than "
                f"leak_idle_seconds ({self.leak_idle_seconds:g} s) they are reported as leaked, utilisation "
                f"climbs towards the WARNING mark, and {shop.REPORTS_APP} goes over its budget of {REPORTS_BUDGET}.",
                advice="in threads, management commands and Celery tasks that use the ORM, call "
                "django.db.close_old_connections() (or connection.close()) when done; keep CONN_MAX_AGE finite.",
            ),
            Phase(
                "stuck",
                "a checkout opens transaction.atomic() and waits on a slow payment call; "
                "2 buyers of the same product queue on its row lock",
                self.start_stuck,
                self.stop_stuck,
                expect="one connection idle in transaction whose age grows (WARNING after 2 s, CRITICAL after "
                f"{max(3, round(self.phase_seconds / 2))} s), and the 2 buyers waiting on its lock.",
                advice="keep slow calls (payments, HTTP, e-mail) out of transaction.atomic(); set "
                "idle_in_transaction_session_timeout so PostgreSQL ends such sessions.",
            ),
            Phase(
                "saturation",
                f"{DASHBOARD_CLIENTS} concurrent slow dashboard requests: more than the pool "
                f"({POOL_SIZE}) serves, more clients than max_client_conn ({MAX_CLIENT_CONN}) admits",
                self.start_saturation,
                self.stop_saturation,
                expect="clients queueing at PgBouncer (cl_waiting, maxwait), max_client_conn reached, requests "
                "failing with HTTP 500, and max_client_conn errors counted in PgBouncer's log.",
                advice="size the pool for the concurrency (default_pool_size within PostgreSQL's usable slots), "
                "raise max_client_conn to cover every worker thread, or run fewer workers; shorten slow requests.",
            ),
        ]

    def start_healthy(self) -> None:
        def pick(rng: random.Random) -> tuple[str, str]:
            if rng.random() < 0.2:
                return "POST", f"/orders/{rng.randint(2, shop.PRODUCTS)}/"
            return "GET", "/products/"

        self.traffic.append(Traffic(self.base, "browse", 3, pick, think=0.05).start())

    def start_leak(self) -> None:
        for _ in range(REPORT_THREADS):
            with urllib.request.urlopen(self.base + "/reports/start/", timeout=HTTP_TIMEOUT) as response:  # noqa: S310
                response.read()

    def stop_leak(self) -> None:
        STATE.stop_reports.set()
        for thread in list(STATE.report_threads):
            thread.join(5)
        self.say(f"{self.clock()} leak over: the report threads finished and closed their connections")
        self.say(
            *live.wrap(
                f"PgBouncer keeps the session pool's {REPORT_THREADS} server connections open, idle, until "
                f"server_idle_timeout ({self.server_idle_timeout} s here, 600 s by default) closes them. Until "
                "then PostgreSQL still counts them, as app=none: PgBouncer resets application_name when a client "
                "leaves. Waiting for them to close, so the next phase starts from a clean slate.",
                indent="  ",
            )
        )
        left = self.wait_for_reports_pool_to_close(self.server_idle_timeout + 10)
        if left:
            self.say(f"{self.clock()} {live.plural(left, 'server connection')} of the session pool still open")
        else:
            self.say(f"{self.clock()} PgBouncer closed the session pool's server connections")

    def reports_server_connections(self) -> int:
        """Server connections PgBouncer holds for the `shop_reports` pool (SHOW POOLS)."""
        box = self.sandbox
        assert box is not None
        user = sandbox_module.Sandbox.MONITOR_USER
        with psycopg.connect(
            host="127.0.0.1", port=box.pgbouncer.port, user=user, password=box.pgbouncer.users[user],
            dbname="pgbouncer", autocommit=True, connect_timeout=5,
            cursor_factory=psycopg.ClientCursor, prepare_threshold=None,
        ) as conn:  # fmt: skip
            cursor = conn.execute("SHOW POOLS")
            columns = [c.name for c in cursor.description or ()]
            rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        states = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
        return sum(int(row.get(state) or 0) for row in rows if row["database"] == "shop_reports" for state in states)

    def wait_for_reports_pool_to_close(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (left := self.reports_server_connections()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def start_stuck(self) -> None:
        STATE.release_checkouts.clear()
        hold = self.phase_seconds + 10
        stuck = Traffic(self.base, "checkout", 1, lambda rng: ("POST", f"/checkout/1/?hold={hold:g}"), once=True)
        self.traffic.append(stuck.start())
        time.sleep(0.5)
        self.traffic.append(Traffic(self.base, "buy-1", 2, lambda rng: ("POST", "/orders/1/")).start())

    def stop_stuck(self) -> None:
        STATE.release_checkouts.set()
        for traffic in self.traffic:
            if traffic.name in ("checkout", "buy-1"):
                traffic.stop()
                traffic.join()
        self.say(f"{self.clock()} stuck over: the payment call returned and the checkout committed")
        self.say(
            *live.wrap(
                "The commit releases the row lock: the buyers' orders go through, and the idle in transaction "
                "finding clears at the next run.",
                indent="  ",
            )
        )

    def start_saturation(self) -> None:
        self.traffic.append(
            Traffic(self.base, "dashboard", DASHBOARD_CLIENTS, lambda rng: ("GET", "/dashboard/?seconds=0.4")).start()
        )

    def stop_saturation(self) -> None:
        for traffic in self.traffic:
            if traffic.name == "dashboard":
                traffic.stop()
                traffic.join()
        self.say(f"{self.clock()} saturation over: the dashboard clients went away")
        self.say(
            *live.wrap(
                "PgBouncer's waiting queue drains and its client count falls back; the transaction pool keeps "
                f"its {POOL_SIZE} server connections open for the next requests.",
                indent="  ",
            )
        )

    # -- the live view --------------------------------------------------------------------------
    def observe(self, phase: Phase, number: int, total: int) -> None:
        from datadog_checks.base.stubs import aggregator

        aggregator.reset()
        error = self.check.run()
        self.check.get_warnings()
        metrics = [stub for name in aggregator.metric_names for stub in aggregator.metrics(name)]
        checks = [stub for name in aggregator.service_check_names for stub in aggregator.service_checks(name)]
        aggregator.reset()
        traffic = " | ".join(t.since_last() for t in self.traffic if t.running)
        figures = live.Figures(metrics, checks, error)
        self.say(f"{self.clock()} {phase.name} ({number}/{total})", *live.render(figures, traffic or "none"))
        health = figures.service_checks.get(live.HEALTH)
        found = live.findings(health.message if health is not None else "")
        self.remember(phase.name, found)
        if any("(churn" in finding for finding in found) and phase.name not in self.explained:
            self.explained.add(phase.name)
            self.say(
                *live.wrap(
                    "why churn: connections opened and closed again over the last minute of the check's runs "
                    "(sessions opened less the growth of the connection count): a burst of connections that "
                    "stay is not counted. "
                    + (
                        f"The {REPORT_THREADS} report threads keep theirs; what churns is named, where a "
                        "source names it (the PostgreSQL log with log_connections, or the processes' counters)."
                        if phase.name == "leak"
                        else "PgBouncer opens server connections for a burst of requests and closes them after "
                        f"server_idle_timeout ({self.server_idle_timeout} s here)."
                    )
                )
            )

    def remember(self, phase: str, found: list[str]) -> None:
        """Keep each finding of a phase at its worst status and latest figures, for the summary."""
        seen = self.found.setdefault(phase, {})
        for finding in found:
            match = FINDING.match(finding)
            if match is None or match[1] == "OK":
                continue
            status, text = match[1], match[2]
            key = FIGURE.sub("#", text)
            if key not in seen or RANK[status] >= RANK[seen[key][0]]:
                seen[key] = (status, text)

    def summary(self, phases: list[Phase]) -> list[str]:
        lines = ["", "=== summary: what the check found, and what to do ==="]
        indent = " " * 12
        for phase in phases:
            found = sorted(self.found.get(phase.name, {}).values(), key=lambda item: -RANK[item[0]])
            lines.append(f"{phase.name:<11} {found[0][0] if found else 'OK: nothing to report'}")
            for level, text in found[:SUMMARY_FINDINGS]:
                lines += live.wrap(f"{level}: {text}", indent=indent)
            if len(found) > SUMMARY_FINDINGS:
                lines.append(f"{indent}and {live.plural(len(found) - SUMMARY_FINDINGS, 'more finding')}")
            lines += live.wrap(f"what to do: {phase.advice}", indent=indent)
        lines += [
            "",
            "next:",
            *live.wrap("- give each Django process an application_name (DATABASES OPTIONS): findings name it;", "  "),
            *live.wrap("- write a conf.yaml for your own PostgreSQL and PgBouncer (README, Configuration) and run "
                       "./run check -c conf.yaml to see what the check reports there;", "  "),
            *live.wrap("- install the check in the Agent (README, Installation), then import "
                       "assets/dashboards/django_db_overview.json and the monitors in assets/monitors/.", "  "),
        ]  # fmt: skip
        return lines

    def run_phases(self) -> None:
        phases = self.phases()
        for number, phase in enumerate(phases, 1):
            self.say("", f"{self.clock()} === phase {number}/{len(phases)}: {phase.name} === {phase.what}")
            if phase.expect:
                self.say(*live.wrap(f"watch for: {phase.expect}", indent="  "))
            phase.start()
            end = time.monotonic() + self.phase_seconds
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                time.sleep(min(self.interval, end - now))
                self.observe(phase, number, len(phases))
            phase.stop()

    # -- tear-down ------------------------------------------------------------------------------
    def close(self) -> list[str]:
        """Stop everything started; the names of threads that did not end."""
        STATE.release_checkouts.set()
        STATE.stop_reports.set()
        for traffic in self.traffic:
            traffic.stop()
        if self.check is not None:
            self.check.cancel()
        box = self.sandbox
        if box is not None:
            # Servers first: requests still waiting on them fail at once instead of running out.
            box.pgbouncer.stop()
            box.postgres.stop()
        left: list[str] = []
        for traffic in self.traffic:
            left += traffic.join()
        for thread in list(STATE.report_threads):
            thread.join(5)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.server_thread is not None:
            self.server_thread.join(5)
        if self.exporter is not None:
            server, thread = self.exporter
            server.shutdown()
            server.server_close()
            thread.join(5)
        if self.pool is not None:
            left += self.pool.shutdown(10)
        if box is not None:
            box.close()
        started = [*STATE.report_threads, *(t for traffic in self.traffic for t in traffic.threads)]
        started += [self.server_thread] if self.server_thread is not None else []
        left += [thread.name for thread in started if thread.is_alive()]
        return sorted(set(left))


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


def run(phase_seconds: float, interval: float, out: TextIO, err: TextIO) -> int:
    demo = Demo(phase_seconds, interval, out)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    status = 0
    try:
        demo.start()
        demo.run_phases()
        demo.say("", f"{demo.clock()} all phases done")
        demo.say(*demo.summary(demo.phases()))
    except sandbox_module.SandboxError as e:
        err.write(f"django_db demo: {e}\n")
        status = 1
    except KeyboardInterrupt:
        demo.say("", f"{demo.clock()} interrupted")
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            left = demo.close()
            root = demo.sandbox.root if demo.sandbox is not None else None
            gone = f", {root} removed" if root is not None and not root.exists() else ""
            demo.say(f"{demo.clock()} cleaned up: servers stopped{gone}")
            if left:
                demo.say(f"threads still running: {', '.join(left)}")
                status = status or 1
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    return status
