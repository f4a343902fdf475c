"""DjangoDbCheck: wires config, sources, evaluation and submission together.

Data flows one way: config -> sources (I/O, typed records) -> evaluation (pure
functions: metrics, findings, alignment) -> submission.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from functools import cached_property, lru_cache, partial
from typing import Any, NamedTuple

from datadog_checks.base import AgentCheck, ConfigurationError

from . import config
from .connection import Source, describe
from .evaluate import session_state
from .evaluate.alignment import alignment_failures
from .evaluate.apps import excuse_pools
from .evaluate.budgets import app_metrics, budget_findings
from .evaluate.churn import POOLER, authorized_apps, churn_finding
from .evaluate.django_metrics import DjangoHistory, DjangoRun, django_findings, django_metrics, failure_text
from .evaluate.health import fitted, pgbouncer_findings, postgres_findings, signature_findings
from .evaluate.held import Held, after_restart, restarted, said_ago
from .evaluate.log_prefix import AppOf, app_finder
from .evaluate.model import NOTES, Finding, Kind, Metric, Status, finding_metrics, message, tag_value, worst
from .evaluate.mysql import MysqlHistory, mysql_alignment, mysql_findings, mysql_metrics
from .evaluate.otel import django_pools, pgbouncer_pools, pool_metrics, query_wait_timeouts
from .evaluate.pgbouncer import pgbouncer_metrics
from .evaluate.pgbouncer_clients import client_metrics, leak_findings, resolve_quiet
from .evaluate.pooler import (
    KEPT_SECONDS,
    Pooler,
    ServerEvents,
    overdue_findings,
    pooler_keys,
    pooler_of,
    unmatched,
    unmatched_finding,
    without_leaks,
)
from .evaluate.postgres import SessionHistory, postgres_metrics
from .evaluate.signatures import LogRecords, classify_failure, mysql_errno
from .owners import is_direct
from .quiet import LastUse, quiet_findings
from .records import MysqlSnapshot, PgbSnapshot, PgSnapshot
from .redact import instance_secrets, redact, secret_patterns
from .sources.django_metrics import DjangoMetricsSource
from .sources.logs import LogFollower
from .sources.mysql import MysqlSource
from .sources.pgbouncer import EVERY_RUN, PgBouncerSource
from .sources.postgres import PostgresSource
from .sparse import Sparse

POSTGRES_CAN_CONNECT = "django_db.postgres.can_connect"
PGBOUNCER_CAN_CONNECT = "django_db.pgbouncer.can_connect"
MYSQL_CAN_CONNECT = "django_db.mysql.can_connect"
CONNECTION_HEALTH = "django_db.connection_health"
CONFIG_ALIGNMENT = "django_db.config_alignment"
DJANGO_CAN_SCRAPE = "django_db.django.can_scrape"
RESTART_WINDOW = 300.0  # seconds after a restart in which the clients' errors are told as its
MAX_TARGETS = 64  # PgBouncer's addr:port for this PostgreSQL, learnt: its configured hosts, a few
SERVERS = {  # an endpoint's kind: how messages name the server, and its can_connect check
    "postgres": ("PostgreSQL", POSTGRES_CAN_CONNECT),
    "pgbouncer": ("PgBouncer", PGBOUNCER_CAN_CONNECT),
    "mysql": ("MySQL", MYSQL_CAN_CONNECT),
}

Seen = list[tuple[str, str, str]]  # (signature, source, server tag) of every error met in a run


class LogRun(NamedTuple):
    """What one run read in the log files."""

    seen: Seen  # the signatures, each record once
    authorized: Counter[str]  # the connections PostgreSQL logged, by application
    apps: dict[str, Counter[str]]  # by signature, the applications the lines named (PostgreSQL's %a)
    query_wait_timeouts: Counter[str]  # PgBouncer's, by db/user (for OpenTelemetry's current names)
    server_events: ServerEvents  # the logins and closes of servers PgBouncer logged


# A run without log files: read only, never changed.
NO_LOGS = LogRun([], Counter(), {}, Counter(), ServerEvents())


@lru_cache(maxsize=64)
def endpoint_tags(tag: str, tags: tuple[str, ...]) -> tuple[str, ...]:
    """A server's service-check tags: its own, then the instance's."""
    return (tag, *tags)


class DjangoDbCheck(AgentCheck):  # type: ignore[no-untyped-call]  # the base class is not typed
    __NAMESPACE__ = ""

    def __init__(self, name: str, init_config: Any, instances: list[dict[str, Any]]):
        # The base class reads a few options of the instance itself: refuse a malformed one first.
        config.parse(instances[0] if instances else None)
        # The instance's own secrets, masked wherever a server or proxy echoes one in an error.
        self.secrets = secret_patterns(instance_secrets(instances[0]))
        try:
            super().__init__(name, init_config, instances)
        except ConfigurationError:
            raise
        except Exception as e:  # an option only the base class reads, of a type it cannot use
            detail = " ".join(redact(f"{type(e).__name__}: {e}", self.secrets).split())[:200]
            raise ConfigurationError(f"an option of the Agent's own is malformed: {detail}") from None
        # The base class would validate the models lazily, at the first run: validate now, so that
        # a bad instance fails at start. The package path also holds in the checks.d copy.
        self.load_configuration_models(f"{__package__}.config_models")  # type: ignore[no-untyped-call]
        if self._config_model_instance is None:
            raise ConfigurationError("the configuration models of the check are missing")
        self.settings = config.settings_from(self._config_model_instance)
        s = self.settings
        both = bool(s.postgres and s.pgbouncers)
        self.postgres = None
        if s.postgres:
            reads = (s.group_by, s.leak_idle_seconds, self.log, s.apps, s.report_leak_queries)
            providers = (s.provider_users, s.provider_databases)
            self.postgres = PostgresSource(
                s.postgres, *reads, pooler=both, networks=s.pooler_networks, providers=providers
            )
        every_run = tuple(show for group, show in EVERY_RUN.items() if group in s.extra_metrics)
        self.pgbouncers = [PgBouncerSource(endpoint, both, every_run) for endpoint in s.pgbouncers]
        self.pgbouncer = self.pgbouncers[0] if self.pgbouncers else None
        # Each PgBouncer's server connections as last read (by its tag): kept through runs that could not read
        # them, for KEPT_SECONDS, so that a hung PgBouncer's idle servers are not taken for an application's leak.
        self.poolers: dict[str, Pooler] = {}
        self.bouncers: dict[str, PgbSnapshot] = {}  # this run's snapshot of each PgBouncer read, by its tag
        self._unmatched: dict[str, int] = {}  # runs in a row each PgBouncer's servers matched no backend
        self.targets: set[tuple[str, int]] = set()  # the addr:port PgBouncers dial this PostgreSQL at
        self.unread: list[str] = []  # as the last PostgreSQL run found them: PgBouncers whose servers are unknown
        if self.postgres is not None and self.pgbouncers:
            self.postgres.servers = lambda where: pooler_keys(tuple(self.poolers.values()), where)
        # imports PyMySQL
        self.mysql = MysqlSource(s.mysql, s.leak_idle_seconds, s.provider_users) if s.mysql else None
        # Each server source with what is kept of it between runs (in its evaluation's history). PgBouncer
        # first: its server connections tell its backends from the applications' at PostgreSQL.
        self.servers: list[tuple[Source, Callable[[Any], list[Finding]]]] = []
        for source in self.pgbouncers:
            self.servers.append((source, partial(self.evaluate_pgbouncer, source.endpoint)))
        if self.postgres:
            self.sessions = SessionHistory()
            self.servers.append((self.postgres, self.evaluate_postgres))
        if self.mysql:
            self.mysql_history = MysqlHistory()
            self.servers.append((self.mysql, self.evaluate_mysql))
        self.logs = LogFollower(s.log_files, s.log_max_bytes_per_run) if s.log_files else None
        self._log_problems: dict[str, str] = {}
        self._log_records: dict[str, LogRecords] = {}  # per file: a record cut between runs goes on in the next
        self._app_of: AppOf | None = None  # reads %a of PostgreSQL's log_line_prefix
        self._said_no_app_name = False  # PgBouncer before 1.18 has no application_name: logged once
        self._notes: set[tuple[str, ...]] = set()  # the notes logged, while they last
        self.last_use: dict[str, LastUse] = {}  # by PgBouncer: when each application last used a client
        self.held = Held()  # findings from errors, kept for finding_hold_seconds after their last line
        self.restarts: dict[str, float] = {}  # the servers found restarted (their label): when
        self._away: set[str] = set()  # PgBouncers that could not be read since their last answer
        self.say_at_start()
        self.django = DjangoMetricsSource(s.django_metrics, self.init_config, self.log) if s.django_metrics else None
        self.django_history = DjangoHistory()
        self.sparse = Sparse()
        self._submitters: dict[Kind, Callable[..., None]] = {
            "gauge": self.gauge,
            "rate": self.rate,
            "count": self.count,
            "monotonic_count": self.monotonic_count,
        }

    def say_at_start(self) -> None:
        """What the configuration decides that a reader of the options may not expect: profiles whose leak
        threshold replaces leak_idle_seconds, budgets MySQL cannot count."""
        s = self.settings
        for profile in s.apps:
            if profile.leak_idle_seconds != s.leak_idle_seconds:
                self.log.info(
                    "apps profile %s: its applications' leak threshold is %g s (from its conn_max_age=%s), not the "
                    "instance's leak_idle_seconds=%g s",
                    profile.name, profile.leak_idle_seconds,
                    "null" if profile.conn_max_age is None else f"{profile.conn_max_age:g}", s.leak_idle_seconds,
                )  # fmt: skip
        budgets = [p.name for p in s.apps if p.max_connections is not None]
        if s.mysql is not None and budgets:
            self.log.warning(
                "apps profiles %s: MySQL names no application (its process list has users and hosts only), so "
                "their max_connections are not counted on MySQL",
                ", ".join(budgets),
            )

    @cached_property
    def health_tags(self) -> tuple[str, ...]:
        """The tags of the check's own service checks: every server's, then the instance's."""
        endpoints = (self.settings.postgres, *self.settings.pgbouncers, self.settings.mysql)
        return (*(e.tag for e in endpoints if e), *self.settings.tags)

    def of_pgbouncer(self, endpoint: config.Endpoint) -> config.Settings:
        """The settings as one PgBouncer's evaluation reads them: ``pgbouncer`` is that one."""
        s = self.settings
        return s if endpoint is s.pgbouncer else replace(s, pgbouncer=endpoint)

    # -- the run ---------------------------------------------------------------------------
    def check(self, _: Any) -> None:
        try:
            self.collect()
        finally:
            self.submit_as_is(self.sparse.end_run())

    def collect(self) -> None:
        seen: Seen = []
        findings: list[Finding] = []
        found_by: dict[str, list[Finding]] = {}
        seen_by: dict[str, Seen] = {}
        snapshots: dict[str, Any] = {}
        self.bouncers = {}
        for source, evaluate in self.servers:  # PgBouncer first: its servers tell its backends at PostgreSQL
            kind = source.endpoint.kind
            if kind == "postgres":
                self.expire_poolers()
            snapshot = self.read(source, seen_by.setdefault(kind, []))
            found_by.setdefault(kind, []).extend(self.restart_of(source, snapshot))
            if snapshot is not None:
                if kind == "pgbouncer":
                    self.bouncers[source.endpoint.tag] = snapshot
                snapshots.setdefault(kind, snapshot)
                found_by.setdefault(kind, []).extend(self.on(source, evaluate(snapshot)))
        for kind in ("postgres", "pgbouncer", "mysql"):
            findings += found_by.get(kind, [])
            seen += seen_by.get(kind, [])
        pg: PgSnapshot | None = snapshots.get("postgres")
        pgb = self.all_clients()
        my: MysqlSnapshot | None = snapshots.get("mysql")
        logged = NO_LOGS
        # While a PgBouncer's server connections cannot be told from the applications', no budget counts there.
        judged = pg if pg is not None and not self.unread else None
        if self.settings.apps and (judged is not None or pgb is not None):
            self.submit(app_metrics(judged, pgb, self.settings))
            findings += self.on(self.postgres or self.pgbouncer, budget_findings(judged, pgb, self.settings))
        if self.logs is not None:
            if pg is not None:  # the application's name in PostgreSQL's log lines, where they carry it
                self._app_of = app_finder(pg.settings.log_line_prefix)
            logged = self.collect_logs(self.logs)
            seen += logged.seen
        run = self.collect_django(self.django) if self.django is not None else None
        if self.settings.otel_current:
            self.submit_pools(run, logged.query_wait_timeouts)
        named: set[str] = set()
        if pg is not None:
            found_churn, named = self.churn_findings(pg, run, logged)
            findings += self.on(self.postgres, found_churn)
        if run is not None:
            findings += django_findings(run, self.settings.thresholds.churn_per_minute, named, self.settings)
        now = time.monotonic()
        held, held_apps, ages = self.held.hold(seen, logged.apps, now, self.settings.finding_hold_seconds)
        if pgb is not None and self.pgbouncer is not None and not pgb.new_connection:
            if any(name == session_state.PREPARED for name, _, _ in seen + held):  # its advice turns on a reload
                pgb = replace(pgb, config=self.pgbouncer.config_now())
        if self.restarts:
            window = max(self.settings.finding_hold_seconds, RESTART_WINDOW)
            self.restarts = {label: at for label, at in self.restarts.items() if now - at < window}
        if seen or held:
            from_errors = signature_findings(seen + held, pg, pgb, {**logged.apps, **held_apps}, self.settings)
            from_errors = said_ago(from_errors, ages)
            findings += after_restart(from_errors, {label: now - at for label, at in self.restarts.items()})
        for signature, source_kind, server in seen:
            self.count_error(signature, source_kind, server)
        self.say_notes(findings)
        self.report(CONNECTION_HEALTH, worst(findings), self.health_tags, message(findings))
        if (pg is not None and self.bouncers) or my is not None:
            failures = []
            if pg is not None:
                for source in self.pgbouncers:
                    read = self.bouncers.get(source.endpoint.tag)
                    if read is not None:
                        failures += alignment_failures(self.of_pgbouncer(source.endpoint), pg, read)
            failures += self.on(self.mysql, mysql_alignment(self.settings, my)) if my is not None else []
            status = worst(failures)
            self.report(CONFIG_ALIGNMENT, status, self.health_tags, "; ".join(f.sentence() for f in failures))
            findings += failures
        self.submit(finding_metrics(findings, self.settings.max_tag_values, self.settings.tags))

    def restart_of(self, source: Source, snapshot: Any) -> list[Finding]:
        """A restart of the server, once: as its source found it (PostgreSQL's start time moved, MySQL's Uptime
        went back), or PgBouncer answering again over a new connection after the one kept from before broke or
        the server went away."""
        endpoint = source.endpoint
        label = f"{SERVERS[endpoint.kind][0]} {endpoint.server_tag}"
        if snapshot is None:
            if endpoint.kind == "pgbouncer" and endpoint.tag in self.last_use:  # read before: away now
                self._away.add(endpoint.tag)
            return []
        how, source.restarted = source.restarted, ""
        if endpoint.kind == "pgbouncer" and snapshot.new_connection:
            if source.lost is not None or endpoint.tag in self._away:
                how = "the check's connection to its console broke and a new one was answered"
            self._away.discard(endpoint.tag)
        if not how:
            return []
        self.restarts[label] = time.monotonic()
        return [restarted(endpoint.tag, label, how)]

    def say_notes(self, findings: list[Finding]) -> None:
        """Log each note once while it lasts (a quiet application until it is used again, a restart)."""
        notes = {
            (f.code, f.server, *(tag for subject in f.subjects for tag in subject.tags)): f
            for f in findings
            if f.code in NOTES
        }
        for key, finding in notes.items():
            if key not in self._notes:
                self.log.info("%s", finding.sentence())
        self._notes = set(notes)

    @staticmethod
    def on(source: Source | None, findings: list[Finding]) -> list[Finding]:
        """The findings of one server, tagged with it where they name no server of their own."""
        if source is None:
            return findings
        tag = source.endpoint.tag
        return [f if f.server else f._replace(server=tag) for f in findings]

    def read(self, source: Source, seen: Seen) -> Any:
        """A server's snapshot, and its can_connect service check; None when it cannot be read, with the
        error in ``seen``. A connection lost between runs is counted once, whatever the outcome."""
        endpoint = source.endpoint
        label, can_connect = SERVERS[endpoint.kind]
        tags = endpoint_tags(endpoint.tag, self.settings.tags)
        try:
            snapshot = source.snapshot()
        except Exception as e:
            seen.append(self.report_error(e, label, endpoint, can_connect, tags))
            return None
        finally:
            self.count_lost(source, label)
        self.service_check(can_connect, Status.OK, tags=tags)
        return snapshot

    def evaluate_postgres(self, snapshot: PgSnapshot) -> list[Finding]:
        if snapshot.new_connection and not self.pgbouncer:
            self.set_metadata("version", snapshot.settings.version.split()[0])
        # The PgBouncers no recent read of which tells their server connections: while one is, PostgreSQL's
        # backends are not judged as the applications'.
        unread = [p.endpoint.server_tag for p in self.pgbouncers if p.endpoint.tag not in self.poolers]
        if unread and not self.unread:
            self.log.warning(
                "PgBouncer %s could not be read yet (or for over %d s): its server connections cannot be told from "
                "the applications' at PostgreSQL, so no leak or budget is judged there until it is",
                ", ".join(unread), KEPT_SECONDS,
            )  # fmt: skip
        self.unread = unread
        if unread:  # PgBouncer's server connections cannot be told from the applications': no leak judged
            snapshot = without_leaks(snapshot)
        snapshot = excuse_pools(snapshot, self.settings)
        opened = self.sessions.opened_by_db(snapshot)
        metrics, folded = postgres_metrics(snapshot, self.settings, opened, leaks_judged=not unread)
        self.log_folded(folded)
        self.submit(metrics)
        clients_read = bool(self.pgbouncers) and all(
            (read := self.bouncers.get(p.endpoint.tag)) is not None and read.clients is not None
            for p in self.pgbouncers
        )
        findings = postgres_findings(snapshot, self.settings, held_counted_at_pgbouncer=clients_read)
        for pooler in self.poolers.values():
            findings += overdue_findings(snapshot, pooler, self.settings)
        return findings + self.unmatched_findings(snapshot)

    def expire_poolers(self) -> None:
        """Forget what a PgBouncer said of its server connections once it is too old to stand for them."""
        now = time.monotonic()
        for tag, pooler in list(self.poolers.items()):
            if now - pooler.read_at > KEPT_SECONDS:
                del self.poolers[tag]

    def unmatched_findings(self, snapshot: PgSnapshot) -> list[Finding]:
        """A PgBouncer read none of whose server connections is a backend of this PostgreSQL, two runs in a row
        (servers PgBouncer closed between its read and PostgreSQL's are no sign): said in the health message
        while it lasts, and once in the log."""
        if self.postgres is None:
            return []
        found = []
        for tag in self.bouncers:
            pooler = self.poolers.get(tag)
            count = unmatched(snapshot, pooler, self.postgres.address) if pooler is not None else 0
            if not count or pooler is None:
                self._unmatched.pop(tag, None)
                continue
            runs = self._unmatched[tag] = self._unmatched.get(tag, 0) + 1
            if runs < 2:
                continue
            finding = unmatched_finding(pooler, count)
            if runs == 2:
                self.log.warning("%s", finding.sentence())
            found.append(finding)
        return found

    def all_clients(self) -> PgbSnapshot | None:
        """The first PgBouncer read this run, with every read PgBouncer's clients: what budgets and the
        signatures' advice count (one PgBouncer: its snapshot as it is)."""
        read = list(self.bouncers.values())
        if len(read) <= 1:
            return read[0] if read else None
        groups = tuple(g for snapshot in read if snapshot.clients is not None for g in snapshot.clients.groups)
        first = read[0]
        if first.clients is None:
            return first
        return replace(first, clients=replace(first.clients, groups=groups))

    def evaluate_pgbouncer(self, endpoint: config.Endpoint, snapshot: PgbSnapshot) -> list[Finding]:
        if snapshot.new_connection and snapshot.version and endpoint is self.settings.pgbouncer:
            self.set_metadata("version", snapshot.version)
        settings = self.of_pgbouncer(endpoint)
        self.submit(pgbouncer_metrics(snapshot, settings))
        clients, quiet = resolve_quiet(snapshot, settings, self.last_use.setdefault(endpoint.tag, LastUse()))
        metrics, folded = client_metrics(clients, settings)
        self.log_folded(folded)
        self.submit(metrics)
        if snapshot.clients is not None and not snapshot.clients.has_app and not self._said_no_app_name:
            self._said_no_app_name = True
            self.log.info(
                "PgBouncer %s has no application_name in SHOW CLIENTS (1.18 on): its clients are counted by "
                "database, user, state and host, all as app:none",
                snapshot.version or "of an unknown version",
            )
        if self.postgres is not None:
            self.poolers[endpoint.tag] = pooler_of(snapshot, endpoint.tag, time.monotonic())
        found = pgbouncer_findings(snapshot, settings) + leak_findings(clients, snapshot, settings)
        return found + quiet_findings(quiet, " at PgBouncer")

    def evaluate_mysql(self, snapshot: MysqlSnapshot) -> list[Finding]:
        if snapshot.new_connection and not (self.postgres or self.pgbouncer):
            self.set_metadata("version", snapshot.variables.version.split("-")[0])
        metrics, folded = mysql_metrics(snapshot, self.settings)
        self.log_folded(folded)
        self.submit(metrics)
        return mysql_findings(snapshot, self.settings, self.mysql_history.churn(snapshot))

    def log_folded(self, folded: Mapping[str, list[str]]) -> None:
        for dimension, values in folded.items():
            self.log.debug("%d values of %s folded into `other`: %s", len(values), dimension, ", ".join(values))

    def churn_findings(
        self, snapshot: PgSnapshot, run: DjangoRun | None, logged: LogRun
    ) -> tuple[list[Finding], set[str]]:
        """The churn verdict, once a minute of runs is behind it; and the applications it names."""
        opened_by_app: dict[str, Mapping[str, float]] = {"log": logged.authorized}
        if run is not None:
            # An application seen at PostgreSQL only through PgBouncer opens its connections at PgBouncer: what
            # its processes count are PgBouncer's client logins, not sessions of PostgreSQL.
            behind = {g.app for g in snapshot.groups if not is_direct(g.pooler)}
            behind -= {g.app for g in snapshot.groups if is_direct(g.pooler)}
            django: dict[str, float] = defaultdict(float)
            for interval in run.intervals:
                if interval.app in behind:
                    continue
                for growth in interval.growth.values():
                    django[interval.app] += growth.opened
            opened_by_app["django"] = django
        reasons: dict[str, float] = {}
        if self.poolers and self.postgres is not None:
            for pooler in self.poolers.values():  # learnt while its servers are there, kept for runs without
                self.targets |= pooler.targets(snapshot)
            if len(self.targets) > MAX_TARGETS:
                self.targets = set()
            logins, reasons = logged.server_events.of(self.postgres.address, self.targets)
            if logins:
                opened_by_app["pgbouncer_log"] = {POOLER: logins}
        churn = self.sessions.churn(snapshot, opened_by_app, reasons)
        if churn is None:
            return [], set()
        config = next(iter(self.poolers.values())).config if self.poolers else None
        finding = churn_finding(churn, self.settings, self.settings.thresholds.churn_per_minute, pooler=config)
        return [finding], {app for app, _, _ in churn.by_app}

    def collect_django(self, source: DjangoMetricsSource) -> DjangoRun:
        """The processes' own view. A failed endpoint shows in its own service check and in
        django_db.errors (source:django), never in connection_health: the servers' view stands."""
        run = self.django_history.update(source.read())
        for scrape in run.scrapes:
            self.service_check(DJANGO_CAN_SCRAPE, Status.OK, tags=self.django_tags(scrape.url, scrape.app))
        for failure in run.failures:
            tags = self.django_tags(failure.url, failure.app)
            text = redact(failure_text(failure), self.secrets)
            self.log.warning("%s", text)
            self.service_check(DJANGO_CAN_SCRAPE, Status.CRITICAL, tags=tags, message=text)
            self.count("django_db.errors", 1, tags=[f"signature:{failure.problem}", "source:django", *tags])
        self.submit(django_metrics(run, self.settings.tags))
        return run

    def submit_pools(self, run: DjangoRun | None, timeouts: Mapping[str, int]) -> None:
        """OpenTelemetry's current metrics of the PgBouncer and Django pools (PostgreSQL's and MySQL's come
        with their other metrics), once this run's logs have told the PgBouncer pools' timeouts."""
        s = self.settings
        for endpoint in s.pgbouncers:
            read = self.bouncers.get(endpoint.tag)
            if read is not None:
                pools = pgbouncer_pools(read, endpoint.server_tag, s.max_tag_values, timeouts)
                self.submit(pool_metrics(pools, (endpoint.tag, *s.tags)))
        if run is not None:
            self.submit(pool_metrics(django_pools(run), s.tags))

    def django_tags(self, url: str, app: str) -> list[str]:
        return [f"django_endpoint:{url}", f"app:{tag_value(app)}", *self.settings.tags]

    def collect_logs(self, logs: LogFollower) -> LogRun:
        """What the lines the log files got since the previous run say."""
        seen: Seen = []
        authorized: Counter[str] = Counter()
        log_apps: dict[str, Counter[str]] = defaultdict(Counter)
        timeouts: Counter[str] = Counter()
        server_events = ServerEvents()
        for path, lines in logs.poll().items():
            records = self._log_records.setdefault(path, LogRecords())
            records.app_of = self._app_of
            for name, count in records.feed(lines).items():
                seen += [(name, "log", f"log_file:{path}")] * count
            for (name, app), count in records.apps.items():
                log_apps[name][app] += count
            authorized += authorized_apps(lines)
            if self.pgbouncer is not None and self.postgres is not None:
                server_events.feed(lines)
            if self.settings.otel_current and self.pgbouncer is not None:
                timeouts += query_wait_timeouts(lines)
        for path, problem in logs.problems.items():
            if self._log_problems.get(path) != problem:
                self.warning("Cannot read log file %s: %s", path, problem)
        self._log_problems = dict(logs.problems)
        return LogRun(seen, authorized, log_apps, timeouts, server_events)

    def count_lost(self, source: Source, label: str) -> None:
        """Count the error that broke the connection kept from the previous run, once.

        The run went on over a new connection: the error is a fact for django_db.errors and the log,
        not a finding, since a server that restarted and came back is healthy.
        """
        if source.lost is None:
            return
        endpoint = source.endpoint
        signature = classify_failure(source.lost)
        self.log.warning(
            "%s %s: the server closed the connection kept from the previous run (%s: %s); connecting again",
            label, endpoint.server_tag, signature.name, " ".join(redact(source.lost.text, self.secrets).split()),
        )  # fmt: skip
        self.count_error(signature.name, endpoint.kind, endpoint.tag)

    def count_error(self, signature: str, source: str, server: str) -> None:
        tags = [server, f"signature:{signature}", f"source:{source}", *self.settings.tags]
        self.count("django_db.errors", 1, tags=tags)

    def report_error(
        self, error: Exception, label: str, endpoint: config.Endpoint, check: str, tags: Sequence[str]
    ) -> tuple[str, str, str]:
        """CRITICAL for the endpoint's can_connect, with the signature and its advice; returns what was seen."""
        signature = classify_failure(describe(error), mysql_errno(error))
        detail = " ".join(redact(str(error), self.secrets).split())
        what = fitted(signature.advice, self.settings)
        text = f"{label} {endpoint.server_tag}: {signature.name}: {detail}. {what}"
        self.log.warning("%s", text)
        self.service_check(check, Status.CRITICAL, tags=tags, message=text)
        return signature.name, endpoint.kind, endpoint.tag

    def report(self, check: str, status: Status, tags: Sequence[str], text: str) -> None:
        """A service check; an OK one carries no message, as the Agent expects."""
        if status == Status.OK:
            self.service_check(check, status, tags=tags)
        else:
            self.service_check(check, status, tags=tags, message=text)

    # -- submission -------------------------------------------------------------------------
    def submit(self, metrics: Iterable[Metric]) -> None:
        """The metrics worth sending (``Sparse``): a zero of what is zero on a healthy stack is not."""
        self.submit_as_is(self.sparse.chosen(metrics))

    def submit_as_is(self, metrics: Iterable[Metric]) -> None:
        submitters = self._submitters
        for kind, name, value, tags in metrics:
            submitters[kind](name, value, tags)  # a tuple: the base class makes its own list of them

    def cancel(self) -> None:
        for resource in (self.postgres, *self.pgbouncers, self.mysql, self.logs, self.django):
            if resource is not None:
                resource.close()
