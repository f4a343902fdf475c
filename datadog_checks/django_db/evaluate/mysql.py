"""MySQL and MariaDB records to metrics, findings and alignment rules. No I/O.

MySQL has no application_name: connections are attributed by user, database and client host.
The `group_by` dimensions map onto those: `db` and `user` as named, `app` and `client_addr`
both to the client host (the nearest MySQL has to an application's name).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as _field

from ..quiet import quiet_findings
from ..records import MysqlSnapshot, MysqlVariables, ProcessGroup
from ..settings import Settings
from .churn import Churn, ChurnWindow, Sample
from .groups import fold, ranked, ratio, select
from .model import Finding, Metric, Status, Subject, crossed, for_app, level, subjects_by, tag_value
from .otel import pool_metrics, server_pools

PREFIX = "django_db.mysql."
DIMENSION_OF = {"db": "db", "user": "user", "app": "client_host", "client_addr": "client_host"}
STATUS_RATES = (
    ("aborted_clients", "aborted_clients"),
    ("aborted_connects", "aborted_connects"),
    ("connections_opened", "connections"),
)


def dimensions(group_by: Iterable[str]) -> tuple[str, ...]:
    """The process list dimensions the `group_by` option asks for, in its order, each once."""
    found: list[str] = []
    for name in group_by:
        dimension = DIMENSION_OF[name]
        if dimension not in found:
            found.append(dimension)
    return tuple(found)


def _tags(group: ProcessGroup, names: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"{name}:{tag_value(getattr(group, name))}" for name in names)


def utilization(snapshot: MysqlSnapshot) -> float:
    """Threads_connected (the check's own included) over max_connections.

    The server admits one client more than max_connections, for a user with SUPER or
    CONNECTION_ADMIN; that extra connection is not counted as capacity, so while it is
    taken utilisation is above 1.
    """
    return ratio(snapshot.status.threads_connected, snapshot.variables.max_connections)


@dataclass
class MysqlHistory:
    """Connections opened between runs, on the server's own clock (Uptime), over a window of runs."""

    window: ChurnWindow = _field(default_factory=ChurnWindow)

    def churn(self, snapshot: MysqlSnapshot) -> Churn | None:
        """Connections opened and closed again over at least a minute of runs; None until then, and again
        after a restart. Failed attempts (Aborted_connects) are no connections."""
        status = snapshot.status
        opened = status.connections - status.aborted_connects
        return self.window.add(Sample(status.uptime, opened, status.threads_connected))


def mysql_metrics(snapshot: MysqlSnapshot, settings: Settings) -> tuple[list[Metric], dict[str, list[str]]]:
    """The MySQL metrics of one snapshot, and the values folded into ``other``."""
    assert settings.mysql is not None
    base = (settings.mysql.tag, *settings.tags)
    variables, counters = snapshot.variables, snapshot.status
    metrics: list[Metric] = []

    def gauge(name: str, value: float, tags: tuple[str, ...] = ()) -> None:
        metrics.append(Metric("gauge", PREFIX + name, value, base + tags))

    gauge("max_connections", variables.max_connections)
    gauge("connections_available", max(0, variables.max_connections - counters.threads_connected))
    gauge("connection_utilization", utilization(snapshot))
    gauge("threads_running", counters.threads_running)
    gauge("max_used_connections", counters.max_used_connections)
    for name, field in STATUS_RATES:
        metrics.append(Metric("rate", PREFIX + name, getattr(counters, field), base))

    names = dimensions(settings.group_by)
    groups, folded = fold(select(snapshot.groups, settings), ("db", "user", "client_host"), settings.max_tag_values)
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    ages: dict[tuple[str, ...], float] = defaultdict(float)
    pools: dict[str, tuple[float, float]] = {}  # (used, idle) by database, for the current OpenTelemetry names
    for g in groups:
        sums[("connections", f"state:{g.state}", *_tags(g, names))] += g.count
        sums[("leaked_connections", *_tags(g, ("db", "user", "client_host")))] += g.leaked
        usage = "idle" if g.state == "idle" else "used"
        sums[("otel", f"state:{usage}", f"pool.name:{settings.mysql.server_tag}/{tag_value(g.db)}")] += g.count
        used, idle = pools.get(tag_value(g.db), (0.0, 0.0))
        pools[tag_value(g.db)] = (used, idle + g.count) if usage == "idle" else (used + g.count, idle)
        key = _tags(g, ("db", "user"))
        ages[("idle.max_age", *key)] = max(ages[("idle.max_age", *key)], g.max_idle)
        ages[("transaction.max_age", *key)] = max(ages[("transaction.max_age", *key)], g.max_transaction_age)
    for (name, *tags), value in sums.items():
        if name == "otel":
            if settings.otel_legacy:
                metrics.append(Metric("gauge", "db.client.connections.usage", value, base + tuple(tags)))
        else:
            gauge(name, value, tuple(tags))
    for (name, *tags), value in ages.items():
        gauge(name, value, tuple(tags))
    if settings.otel_current:
        metrics += pool_metrics(server_pools(settings.mysql.server_tag, pools, variables.max_connections), base)
    return metrics, folded


def _by(counts: Counter[str], key: str, limit: int = 3) -> str:
    return ", ".join(f"{key}={value or 'none'} {n}" for value, n in ranked(counts)[:limit])


def mysql_findings(snapshot: MysqlSnapshot, settings: Settings, churn: Churn | None) -> list[Finding]:
    assert settings.mysql is not None
    t = settings.thresholds
    variables, counters = snapshot.variables, snapshot.status
    findings = []
    by_user: Counter[str] = Counter()
    for g in snapshot.groups:
        by_user[g.user] += g.count
    ratio = utilization(snapshot)
    used, limit = counters.threads_connected, variables.max_connections
    most = f"; most: {_by(by_user, 'user', 1)}" if by_user else ""
    text = f"{used} of {limit} MySQL connections in use ({ratio:.0%} of max_connections{most})"
    if used > limit:
        text = (
            f"{used} MySQL connections for max_connections={limit} ({ratio:.0%}{most}): past the limit only "
            "one more, for SUPER / CONNECTION_ADMIN, is admitted; other clients are refused (1040)"
        )
    status = level(ratio, t.utilization)
    findings.append(Finding("utilization", status, text, figure=ratio, threshold=crossed(t.utilization, status)))

    groups = select(snapshot.groups, settings)
    leaked: Counter[str] = Counter()
    in_tx: Counter[str] = Counter()
    oldest: ProcessGroup | None = None
    for g in groups:
        leaked[g.user] += g.leaked
        if g.provider:  # the managed service's own: its transactions are not the user's to close
            continue
        if g.state == "idle_in_transaction":
            in_tx[g.user] += g.count
        if g.max_transaction_age > 0 and (oldest is None or g.max_transaction_age > oldest.max_transaction_age):
            oldest = g
    leaked = +leaked
    total_leaked = sum(leaked.values())
    if total_leaked:
        text = f"{total_leaked} MySQL connections idle for over {settings.leak_idle_seconds:g} s (leaked): "
        status = level(total_leaked, t.leaked_connections)
        findings.append(
            Finding(
                "leaked_connections",
                status,
                text + _by(leaked, "user"),
                subjects=subjects_by("user", leaked),
                figure=total_leaked,
                threshold=crossed(t.leaked_connections, status),
            )
        )
    findings += quiet_findings(snapshot.quiet, label="user")
    total_tx = sum(in_tx.values())
    if total_tx:
        status = level(total_tx, t.idle_in_transaction_count)
        findings.append(
            Finding(
                "idle_in_transaction",
                status,
                f"{total_tx} MySQL connections idle in transaction ({_by(in_tx, 'user')})",
                subjects=subjects_by("user", in_tx),
                figure=total_tx,
                threshold=crossed(t.idle_in_transaction_count, status),
            )
        )
    if oldest is not None:
        status = level(oldest.max_transaction_age, t.idle_in_transaction_seconds)
        findings.append(
            Finding(
                "long_transaction",
                status,
                f"the oldest MySQL transaction, of user={oldest.user or 'none'} on db={oldest.db or 'none'} "
                f"from {oldest.client_host or 'unknown'}, has been open for {oldest.max_transaction_age:.0f} s",
                subjects=(Subject((f"user:{tag_value(oldest.user)}", f"db:{tag_value(oldest.db)}")),),
                figure=oldest.max_transaction_age,
                threshold=crossed(t.idle_in_transaction_seconds, status),
            )
        )
    if churn is not None:
        status = level(churn.per_minute, t.churn_per_minute)
        findings.append(
            Finding(
                "connection_churn",
                status,
                f"{churn.per_minute:.0f} MySQL connections a minute opened and closed again "
                f"(churn, over {churn.seconds:.0f} s)",
                figure=churn.per_minute,
                threshold=crossed(t.churn_per_minute, status),
            )
        )
    if not snapshot.sees_all_threads:
        findings.append(
            Finding(
                "monitoring_role_blind",
                Status.WARNING,
                "the monitoring user sees only its own MySQL threads",
                f"GRANT PROCESS ON *.* TO '{settings.mysql.username}'@'%'",
            )
        )
    return findings


_INIT_WAIT_TIMEOUT = re.compile(r"\bwait_timeout\s*(?::=|=)\s*(\d+)", re.IGNORECASE)


def applied_wait_timeout(variables: MysqlVariables) -> tuple[int, str]:
    """The wait_timeout an application's session starts with, and where it comes from.

    init_connect runs at the login of every user without SUPER or CONNECTION_ADMIN, which is
    what an application's user should be: a wait_timeout it sets wins over the global one.
    """
    found = _INIT_WAIT_TIMEOUT.findall(variables.init_connect or "")
    if found:
        return int(found[-1]), "init_connect"
    return variables.wait_timeout, "global"


def mysql_alignment(settings: Settings, snapshot: MysqlSnapshot) -> list[Finding]:
    """CONN_MAX_AGE longer than the wait_timeout after which the server closes an idle connection: once for
    the instance's conn_max_age, then for each application profile that gives its own, named after it."""
    assert settings.mysql is not None
    monitor = settings.mysql.username
    users = sorted({g.user for g in snapshot.groups if g.user and g.user != monitor and not g.provider})
    who = f" for user {', '.join(users[:3])}" + (f" and {len(users) - 3} more" if len(users) > 3 else "")
    failures = wait_timeout_rule(settings.conn_max_age, snapshot.variables, who if users else "")
    for profile in settings.apps:
        if profile.conn_max_age != settings.conn_max_age:
            own = wait_timeout_rule(profile.conn_max_age, snapshot.variables, "")
            failures += [for_app(failure, profile.name) for failure in own]
    return failures


def wait_timeout_rule(age: float | None, variables: MysqlVariables, who: str) -> list[Finding]:
    if age is not None and age <= 0:
        return []  # Django closes the connection after each request
    wait_timeout, source = applied_wait_timeout(variables)
    if wait_timeout <= 0 or (age is not None and age <= wait_timeout):
        return []
    described = "conn_max_age=None (persistent)" if age is None else f"conn_max_age={age:g} s"
    origin = " set by init_connect" if source == "init_connect" else ""
    interactive = variables.interactive_timeout
    also = (
        f"; interactive_timeout={interactive} s, for clients that connect as interactive, is shorter too"
        if interactive > 0 and (age is None or age > interactive)
        else ""
    )
    return [
        Finding(
            "conn_max_age_over_wait_timeout",
            Status.WARNING,
            f"{described} is longer than MySQL's wait_timeout={wait_timeout} s{origin}{who}, which applies to "
            f"non-interactive clients such as Django",
            f"the server closes the idle connection first and the next query fails with (2006, 'MySQL server has "
            f"gone away'); keep CONN_MAX_AGE below wait_timeout and set CONN_HEALTH_CHECKS=True{also}",
            figure=age,
            threshold=wait_timeout,
        )
    ]
