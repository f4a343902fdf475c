"""Findings of one run: what is wrong, how badly, and which application causes it. No I/O."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping

from ..owners import counted_at_postgres, is_providers
from ..quiet import quiet_findings
from ..records import LeakSuspect, PgbSnapshot, PgSnapshot
from ..settings import Settings
from . import session_state
from .groups import ranked, select
from .groups import ratio as share
from .model import Finding, Status, Subject, app_subjects, crossed, level, tag_value
from .pgbouncer import client_utilization, used_clients
from .pgbouncer_clients import holders, top_holders, waiting_apps
from .postgres import client_backends
from .queries import normalize_query
from .signatures import BY_NAME, Signature

IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


def _apps(counts: Mapping[str, int], limit: int = 3) -> str:
    return ", ".join(f"app={app or 'none'} {n}" for app, n in ranked(counts)[:limit])


def _of_apps(counts: Mapping[str, int]) -> str:
    """`of app=web ` when one application causes it all, else nothing (the caller lists the applications)."""
    if len(counts) == 1:
        return f"of app={next(iter(counts)) or 'none'} "
    return ""


def signature_findings(
    seen: Iterable[tuple[str, str, str]],
    pg: PgSnapshot | None = None,
    pgb: PgbSnapshot | None = None,
    apps: Mapping[str, Counter[str]] | None = None,
    settings: Settings | None = None,
) -> list[Finding]:
    """One finding per signature seen this run, from any source (postgres, pgbouncer, log), with advice that
    takes the servers' known settings into account.

    ``seen``: (signature, source, server tag: ``log_file:<path>`` for a log). A failure may show in several
    logs (the application's and PgBouncer's): counts are given per log, never added up across logs.
    ``apps``: by signature, the applications log lines named (PostgreSQL's %a), with their counts."""
    by_name: dict[str, Counter[str]] = defaultdict(Counter)
    logs: dict[str, Counter[str]] = defaultdict(Counter)
    servers: dict[str, Counter[str]] = defaultdict(Counter)
    for name, source, server in seen:
        by_name[name][source] += 1
        servers[name][server] += 1
        if source == "log":
            logs[name][server.removeprefix("log_file:")] += 1
    findings = []
    for name, sources in by_name.items():
        signature = BY_NAME[name]
        where = []
        for source, n in sorted(sources.items()):
            if source == "log" and len(logs[name]) > 1:
                files = sorted(logs[name].items(), key=_by_file_name)
                where += [f"{count} in {_file_name(path)}" for path, count in files]
            else:
                where.append(f"{n} from {source}")
        also = "; a failure can show in each log" if len(logs[name]) > 1 else ""
        named = apps.get(name) if apps else None
        also += f"; {_apps(named)}" if named else ""
        subjects = tuple(Subject((server,), n) for server, n in sorted(servers[name].items()))
        if named:  # the applications the lines named: a monitor on django_db.finding routes by app
            subjects += app_subjects(named)
        findings.append(
            Finding(
                name,
                signature.status,
                f"{name} seen ({', '.join(where)}{also})",
                advice(signature, pg, pgb, named or (), settings).rstrip("."),
                subjects,
                # one failure can show in several logs: the most any one place saw
                figure=float(max(servers[name].values())),
            )
        )
    return findings


def _by_file_name(item: tuple[str, int]) -> tuple[str, str]:
    return _file_name(item[0]), item[0]


def _file_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1] or path


def free_slots(pg: PgSnapshot) -> int:
    return max(0, pg.settings.usable_slots - client_backends(pg))


def _pools(pgb: PgbSnapshot, limit: int = 3) -> str:
    """The pools clients wait at (else every pool), with their mode and size."""
    pools = [p for p in pgb.pools if p.cl_waiting or p.maxwait] or list(pgb.pools)
    shown = ", ".join(
        f"{p.db}/{p.user} {p.pool_mode}" + (f" pool_size {p.pool_size:g}" if p.pool_size is not None else "")
        for p in pools[:limit]
    )
    return shown + (f" and {len(pools) - limit} more" if len(pools) > limit else "")


def advice(
    signature: Signature,
    pg: PgSnapshot | None,
    pgb: PgbSnapshot | None,
    apps: Collection[str] = (),
    settings: Settings | None = None,
) -> str:
    """The signature's advice, told for the stack as the run found it where its settings change the answer;
    ``apps``: the applications the logs named with it; and for the CONN_MAX_AGE the applications have
    (``settings``)."""
    return fitted(_advice(signature, pg, pgb, apps), settings)


KEPT_IDLE = "threads or processes that keep connections they no longer use"


def fitted(text: str, settings: Settings | None) -> str:
    """Advice that fits the configured CONN_MAX_AGE (the instance's and the profiles'): no CONN_MAX_AGE=None
    blamed where none is persistent, no lowering a CONN_MAX_AGE that is 0 everywhere."""
    if settings is None:
        return text
    ages = {settings.conn_max_age, *(profile.conn_max_age for profile in settings.apps)}
    if None not in ages:
        text = text.replace("(leaks, CONN_MAX_AGE=None with many threads)", f"(leaks, {KEPT_IDLE})")
        text = text.replace("(leaks, CONN_MAX_AGE=None)", f"(leaks, {KEPT_IDLE})")
    if all(age is not None and age <= 0 for age in ages):
        text = text.replace(", lower CONN_MAX_AGE,", ",")
    return text


def _advice(signature: Signature, pg: PgSnapshot | None, pgb: PgbSnapshot | None, apps: Collection[str]) -> str:
    if signature.name in session_state.NAMES:
        return session_state.advice(signature.name, pgb, apps)
    free = f"; PostgreSQL has {free_slots(pg)} free slots of {pg.settings.usable_slots}" if pg is not None else ""
    if signature.name == "query_wait_timeout" and pgb is not None and pgb.pools:
        modes = {p.pool_mode for p in pgb.pools}
        head = (
            "Clients waited at PgBouncer longer than query_wait_timeout for a server connection: "
            f"the pool is saturated ({_pools(pgb)})"
        )
        if modes == {"transaction"} or modes == {"statement"}:
            return (
                f"{head}. The pools are in {modes.pop()} mode already: shorten transactions (no slow calls "
                f"inside atomic()), or raise pool_size within PostgreSQL's free slots{free}."
            )
        return (
            f"{head}. In session mode each Django connection holds a server connection for its whole life: "
            f"use transaction pool mode (with DISABLE_SERVER_SIDE_CURSORS), shorten transactions, or raise "
            f"pool_size{free}."
        )
    if signature.name in ("too_many_clients", "reserved_slots") and pgb is not None and pgb.pools:
        sizes = [p.pool_size for p in pgb.pools if p.pool_size is not None]
        head = signature.advice.split(". ")[0]
        return (
            f"{head}. PgBouncer is in front already ({_pools(pgb)}; its pools may open "
            f"{sum(sizes):g} server connections): keep the sum of pool sizes, and what connects directly, "
            f"within max_connections={pg.settings.max_connections if pg is not None else 'unknown'}; "
            f"close idle or leaked connections."
        )
    if signature.name == "max_client_conn" and pgb is not None and (held := holders(pgb.clients)):
        return f"{signature.advice.rstrip('.')}. PgBouncer's client connections now: {held}."
    if signature.name in ("pool_timeout", "queuepool_limit") and pg is not None:
        return f"{signature.advice.rstrip('.')}{free}."
    return signature.advice


def postgres_findings(
    snapshot: PgSnapshot, settings: Settings, held_counted_at_pgbouncer: bool = False
) -> list[Finding]:
    """``held_counted_at_pgbouncer``: PgBouncer's clients were read, so a session-mode client's idle server
    connection is that client's leak, told once there (leaked_clients, with the servers it pins), not again here."""
    t = settings.thresholds
    findings = []
    used, usable = client_backends(snapshot), snapshot.settings.usable_slots
    ratio = share(used, usable)
    by_app: dict[str, int] = {}
    for g in snapshot.groups:
        by_app[g.app] = by_app.get(g.app, 0) + g.count
    status = level(ratio, t.utilization)
    findings.append(
        Finding(
            "utilization",
            status,
            f"{used} of {usable} usable slots in use ({ratio:.0%}; most: {_apps(by_app, 1)})"
            if used <= usable
            else f"{used} connections for {usable} usable slots: {used - usable} of the reserved slots taken "
            f"({ratio:.0%}; most: {_apps(by_app, 1)})",
            figure=ratio,
            threshold=crossed(t.utilization, status),
        )
    )

    groups = select(snapshot.groups, settings)
    leaked: dict[str, int] = {}
    in_tx: dict[str, int] = {}
    tx_age: dict[str, float] = {}
    oldest_tx, oldest_app = 0.0, ""
    hidden = 0
    for state, _, _, app, _, count, _, leaks, max_age, _, pooler, _ in groups:
        if leaks and counted_at_postgres(pooler, held_counted_at_pgbouncer):
            leaked[app] = leaked.get(app, 0) + leaks
        if state in IDLE_IN_TRANSACTION and not is_providers(pooler):
            in_tx[app] = in_tx.get(app, 0) + count
            tx_age[app] = max(tx_age.get(app, 0.0), max_age)
            if max_age > oldest_tx:
                oldest_tx, oldest_app = max_age, app
        if state is None:
            hidden += count

    total_leaked = sum(leaked.values())
    if total_leaked:
        limits = {settings.leak_idle_seconds_for(app) for app in leaked}
        over = f"{limits.pop():g} s" if len(limits) == 1 else "their application's leak threshold"
        text = f"{total_leaked} connections {_of_apps(leaked)}idle for over {over} (leaked)"
        if len(leaked) > 1:
            text += f": {_apps(leaked)}"
        if settings.report_leak_queries and snapshot.leak_suspects:
            text += "; suspects: " + " | ".join(describe_suspect(s) for s in _suspects(snapshot, settings))
        status = level(total_leaked, t.leaked_connections)
        findings.append(
            Finding(
                "leaked_connections",
                status,
                text,
                subjects=app_subjects(leaked),
                figure=total_leaked,
                threshold=crossed(t.leaked_connections, status),
            )
        )

    findings += quiet_findings(q for q in snapshot.quiet if settings.applications.allows(q.who))

    total_tx = sum(in_tx.values())
    if total_tx:
        # One finding for them all: how many, of which applications, and the oldest.
        by_count = level(total_tx, t.idle_in_transaction_count)
        by_age = level(oldest_tx, t.idle_in_transaction_seconds)
        if total_tx == 1:
            text = f"a connection of app={oldest_app or 'none'} idle in transaction for {oldest_tx:.0f} s"
        else:
            text = (
                f"{total_tx} connections idle in transaction ({_apps(in_tx)}), "
                f"the oldest for {oldest_tx:.0f} s (app={oldest_app or 'none'})"
            )
        # the figure is what earned the status: the count where it does, else the oldest's age; where the age
        # did, the subjects are the applications whose transactions are that old, not every one in a transaction
        figure, threshold, subjects = (
            (float(total_tx), crossed(t.idle_in_transaction_count, by_count), app_subjects(in_tx))
            if by_count >= by_age
            else (
                oldest_tx,
                crossed(t.idle_in_transaction_seconds, by_age),
                app_subjects({a: n for a, n in in_tx.items() if level(tx_age[a], t.idle_in_transaction_seconds)}),
            )
        )
        findings.append(
            Finding(
                "idle_in_transaction",
                max(by_count, by_age),
                text,
                "a transaction left open while the code waits on something else (a slow call inside atomic(), "
                "a task that never commits); set idle_in_transaction_session_timeout",
                subjects,
                figure,
                threshold,
            )
        )
    if hidden:
        findings.append(
            Finding(
                "monitoring_role_blind",
                Status.WARNING,
                f"{hidden} backends are hidden from the monitoring role",
                f"GRANT pg_monitor TO {settings.postgres.username if settings.postgres else 'the monitoring role'}",
                figure=hidden,
            )
        )
    return findings


def pgbouncer_findings(snapshot: PgbSnapshot, settings: Settings) -> list[Finding]:
    t = settings.thresholds
    findings = []
    ratio = client_utilization(snapshot)
    if ratio is not None:
        status = level(ratio, t.pgbouncer_client_utilization)
        text = (
            f"{used_clients(snapshot)} of {snapshot.config.max_client_conn:g} "
            f"PgBouncer client connections in use ({ratio:.0%} of max_client_conn)"
        )
        subjects: tuple[Subject, ...] = ()
        if status != Status.OK and (held := holders(snapshot.clients)):
            text += f"; held most by {held}"
            subjects = app_subjects(top_holders(snapshot.clients))
        findings.append(
            Finding(
                "pgbouncer_client_utilization",
                status,
                text,
                subjects=subjects,
                figure=ratio,
                threshold=crossed(t.pgbouncer_client_utilization, status),
            )
        )
    waiting = [pool for pool in snapshot.pools if pool.maxwait]
    if waiting:
        pool = max(waiting, key=lambda p: p.maxwait or 0.0)
        status = level(pool.maxwait or 0.0, t.pgbouncer_maxwait_seconds)
        findings.append(
            Finding(
                "pgbouncer_clients_waiting",
                status,
                f"{pool.cl_waiting or 0:.0f} clients waiting at PgBouncer pool {pool.db}/{pool.user}, "
                f"the oldest for {pool.maxwait:.1f} s"
                + (f" ({apps})" if (apps := waiting_apps(snapshot.clients, pool.db, pool.user)) else ""),
                subjects=(
                    Subject((f"pgbouncer_db:{tag_value(pool.db)}", f"user:{tag_value(pool.user)}"), pool.cl_waiting),
                ),
                figure=pool.maxwait,
                threshold=crossed(t.pgbouncer_maxwait_seconds, status),
            )
        )
    return findings


def _suspects(snapshot: PgSnapshot, settings: Settings, limit: int = 3) -> list[LeakSuspect]:
    kept = [
        s for s in snapshot.leak_suspects if settings.applications.allows(s.app) and settings.databases.allows(s.db)
    ]
    return kept[:limit]


def describe_suspect(suspect: LeakSuspect) -> str:
    return (
        f"app={suspect.app or 'none'} from {suspect.client_addr} idle {suspect.idle_seconds:.0f} s, "
        f"last query: {normalize_query(suspect.query)}"
    )
