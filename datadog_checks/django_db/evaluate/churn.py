"""Churn: connections opened and closed again, over at least a minute of the check's own history, and which
applications open them. No I/O.

Opened connections minus the growth of the connection count: a deploy that opens 40 connections and keeps
them is no churn; CONN_MAX_AGE=0 under load is. Who opens them comes from the best source that spoke in
the window, per application, never from two at once:

- ``pgbouncer_log``: PgBouncer's ``new connection to server`` lines (its log in ``log_files``), for the
  sessions PgBouncer opens (``POOLER``);
- ``log``: PostgreSQL's ``connection authorized: ... application_name=...`` lines (``log_connections = on``,
  the server's log in ``log_files``): every connection, however short. PgBouncer logs in without an
  application_name: where PgBouncer's servers are known, the nameless logins are PgBouncer's as far as its
  own log, else the runs' samples, tell;
- ``django``: the processes' own counters (``django_metrics``), for an application the log does not name;
- ``sampled``: backends pg_stat_activity showed as started since the previous run: short connections are
  rarely caught there, so it names an application only when nothing better does. PgBouncer's server
  connections count as PgBouncer's, whatever name its last client gave them.

However many sources named them, the figures never add up to more than the churn itself.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..owners import EXTERNAL_OPENS, PGBOUNCER_OPENS, POOLERS_OPENING, PROVIDER_OPENS
from ..records import PROVIDER_APP, PgbConfig
from ..settings import Level, Settings, profile_for
from .groups import ranked
from .model import Finding, Status, Subject, crossed, level, tag_value

WINDOW = 60.0  # seconds: the least history behind a churn verdict
SOURCES = ("pgbouncer_log", "log", "django", "sampled")  # the best first
SOURCE_NAMES = {
    "pgbouncer_log": "PgBouncer's log",
    "log": "the PostgreSQL log",
    "django": "the processes' counters",
    "sampled": "pg_stat_activity",
}
# Who opens PgBouncer's server connections: PgBouncer; a declared pooler's: that pooler (owners.opener).
POOLER = PGBOUNCER_OPENS

# PostgreSQL 12 and later (log_connections): "connection authorized: user=app database=shop application_name=web",
# then " SSL enabled (...)" or " GSS (...)" when in use; application_name only when the client sent one.
# A replication connection says "replication connection authorized" and is no application's.
AUTHORIZED = re.compile(
    r"(?<!replication )connection authorized: user=\S*(?: database=\S*)?"
    r"(?: application_name=(?P<app>.*?))?(?: SSL enabled \(| GSS \(|$)"
)


def authorized_apps(lines: Iterable[str]) -> Counter[str]:
    """Connections PostgreSQL authorized, by the application_name they gave ('' without one)."""
    found: Counter[str] = Counter()
    for line in lines:
        if "connection authorized: " in line:
            match = AUTHORIZED.search(line.rstrip("\r\n"))
            if match is not None:
                found[match["app"] or ""] += 1
    return found


@dataclass(frozen=True)
class Sample:
    """What one run saw: the server's counters and, per source, what each application opened since the
    previous run."""

    time: float  # the server's clock, seconds
    opened: float  # sessions opened so far, a counter
    connections: int  # client connections now
    by_app: Mapping[str, int] = field(default_factory=dict)  # connections now, by application (or POOLER)
    opened_by_app: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # source: {app: opened}
    reasons: Mapping[str, float] = field(default_factory=dict)  # why PgBouncer closed its servers (its log)


@dataclass(frozen=True)
class Churn:
    per_minute: float  # opened and closed again, a minute
    seconds: float  # the window it was counted over
    opened: float
    growth: float  # of the connection count over the window
    by_app: tuple[tuple[str, float, str], ...] = ()  # (app, churn a minute, source), the most first
    lifetimes: Mapping[str, float] = field(default_factory=dict)  # app: how long its connections lived, seconds
    reasons: tuple[tuple[str, float], ...] = ()  # PgBouncer's reasons for closing its servers, the most first
    servers: int = 0  # PgBouncer's server connections at most, over the window


def _stayed(growth: float) -> float:
    return max(0.0, growth)


@dataclass
class ChurnWindow:
    """The samples of the last minute or so; a counter that went back (a restart, a reset) starts it afresh."""

    window: float = WINDOW
    samples: list[Sample] = field(default_factory=list)

    def add(self, sample: Sample) -> Churn | None:
        """Churn over the newest window of at least ``window`` seconds; None while the history is shorter."""
        last = self.samples[-1] if self.samples else None
        if last is not None and (sample.time <= last.time or sample.opened < last.opened):
            self.samples = []
        samples = self.samples
        samples.append(sample)
        # The times only grow (a sample not later than the last starts afresh): the window starts at
        # the newest sample at least `window` seconds old, found from the oldest kept.
        cutoff = sample.time - self.window
        if samples[0].time > cutoff:
            return None
        first = 0
        while first + 1 < len(samples) and samples[first + 1].time <= cutoff:
            first += 1
        if first:
            del samples[:first]  # older samples are no longer needed
        start = self.samples[0]
        seconds = sample.time - start.time
        opened = sample.opened - start.opened
        growth = sample.connections - start.connections
        per_minute = max(0.0, opened - _stayed(growth)) * 60.0 / seconds
        by_app, lifetimes = self._by_app(start, sample, seconds, per_minute)
        later = self.samples[1:]
        reasons: Counter[str] = Counter()
        for s in later:
            reasons.update(s.reasons)
        servers = max(s.by_app.get(POOLER, 0) for s in self.samples)
        return Churn(per_minute, seconds, opened, growth, by_app, lifetimes, tuple(ranked(reasons)), servers)

    def _opened(self) -> dict[str, dict[str, float]]:
        """What each source says each application opened over the window; PgBouncer's nameless logins at
        PostgreSQL moved from the log's no-name to PgBouncer."""
        later = self.samples[1:]
        opened: dict[str, dict[str, float]] = {source: {} for source in SOURCES}
        for s in later:
            for source in SOURCES:
                counts = opened[source]
                for app, n in s.opened_by_app.get(source, {}).items():
                    counts[app] = counts.get(app, 0.0) + n
        nameless = opened["log"].get("", 0)
        pooler = any(s.by_app.get(POOLER) for s in self.samples) or any(opened[k].get(POOLER) for k in opened)
        if nameless and pooler:
            theirs: float
            if opened["pgbouncer_log"].get(POOLER):
                theirs = min(nameless, opened["pgbouncer_log"][POOLER])
            else:
                # The runs' samples say whose short sessions these were: PgBouncer's, or nameless direct ones.
                mine, direct = opened["sampled"].get(POOLER, 0), opened["sampled"].get("", 0)
                if mine + direct:
                    theirs = nameless * mine / (mine + direct)
                else:
                    theirs = nameless if not any(s.by_app.get("") for s in self.samples) else 0
                opened["log"][POOLER] = opened["log"].get(POOLER, 0.0) + theirs
            opened["log"][""] -= theirs
        return opened

    def _by_app(
        self, start: Sample, end: Sample, seconds: float, per_minute: float
    ) -> tuple[tuple[tuple[str, float, str], ...], dict[str, float]]:
        figures: dict[str, tuple[float, str]] = {}
        lifetimes: dict[str, float] = {}
        for source, opened in self._opened().items():
            for app, n in opened.items():
                if app in figures or n <= 0:
                    continue  # a better source counted it
                growth = end.by_app.get(app, 0) - start.by_app.get(app, 0)
                figures[app] = (max(0.0, n - _stayed(growth)) * 60.0 / seconds, source)
                # Little's law: connections held on average, over those opened a second.
                held = sum(s.by_app.get(app, 0) for s in self.samples) / len(self.samples)
                lifetimes[app] = held * seconds / n
        # Never more than the churn, whatever mix of sources named them: the best sources first.
        left = per_minute
        capped = []
        for app, (rate, source) in sorted(figures.items(), key=lambda item: (SOURCES.index(item[1][1]), -item[1][0])):
            rate = min(rate, left)
            left -= rate
            capped.append((app, rate, source))
        ranked = sorted(capped, key=lambda item: (-item[1], item[0]))
        return tuple(item for item in ranked if item[1] >= 0.5), lifetimes


# Who opens connections other than an application: how churn names them, their subject tag, and (but PgBouncer,
# whose advice depends on its settings) what to do.
OPENERS = {
    POOLER: ("PgBouncer", "pooler:pgbouncer", ""),
    EXTERNAL_OPENS: (
        "the poolers at pooler_addresses",
        "pooler:external",
        "the poolers at pooler_addresses open them: see their own server lifetime and idle timeouts",
    ),
    PROVIDER_OPENS: (
        "the provider's own sessions",
        f"app:{PROVIDER_APP}",
        "the managed service's own sessions open them (app:provider): nothing of the applications",
    ),
}


def who(app: str) -> str:
    return OPENERS[app][0] if app in OPENERS else f"app={app or 'none'}"


def churn_finding(
    churn: Churn, settings: Settings, threshold: Level, what: str = "connections", pooler: PgbConfig | None = None
) -> Finding:
    """The churn verdict: how many a minute and, where known, who opens them (applications, PgBouncer) with
    their share, and advice that fits what each has configured. ``pooler``: PgBouncer's settings, when it
    fronts the server."""
    status = level(churn.per_minute, threshold)
    text = f"{churn.per_minute:.0f} {what} a minute opened and closed again (churn, over {churn.seconds:.0f} s)"
    named = [
        (app, rate, source)
        for app, rate, source in churn.by_app
        if app in POOLERS_OPENING or settings.applications.allows(app)
    ]
    finding = Finding("connection_churn", status, text, figure=churn.per_minute, threshold=crossed(threshold, status))
    if not named:
        if status == Status.OK:
            return finding
        return finding._replace(
            advice="no application named; to name them, turn on log_connections and follow PostgreSQL's log "
            "(log_files), or read the processes' counters (django_metrics)"
        )
    total = max(churn.per_minute, sum(rate for _, rate, _ in named))
    sources = {source for _, _, source in named[:3]}
    parts = []
    for app, rate, source in named[:3]:
        part = f"{who(app)} {rate:.0f} ({rate / total:.0%}"
        part += f", {SOURCE_NAMES[source]})" if len(sources) > 1 else ")"
        parts.append(part)
    if len(named) > 3:
        parts.append(f"{len(named) - 3} more")
    text += ": " + ", ".join(parts)
    if len(sources) == 1:
        text += f", by {SOURCE_NAMES[sources.pop()]}"
    shown = [app for app, _, _ in named[:3]]
    advice = [pooler_advice(churn, pooler)] if POOLER in shown else []
    advice += [OPENERS[app][2] for app in (EXTERNAL_OPENS, PROVIDER_OPENS) if app in shown]
    advice += app_advice([app for app in shown if app not in POOLERS_OPENING], churn.lifetimes, settings)
    subjects = tuple(Subject((subject_tag(app),), rate) for app, rate, _ in named)
    return finding._replace(text=text, advice="; ".join(advice), subjects=subjects)


def subject_tag(app: str) -> str:
    """The tag of who opens connections: an application, PgBouncer itself, a pooler or the provider."""
    return OPENERS[app][1] if app in OPENERS else f"app:{tag_value(app)}"


# A setting that closes PgBouncer's servers explains the churn when the servers it holds, closed that often,
# open at least this share of it.
EXPLAINS = 0.5


def pooler_advice(churn: Churn, config: PgbConfig | None) -> str:
    """Why PgBouncer opens server connections again and again, and what to change in PgBouncer."""
    rate = next((rate for app, rate, _ in churn.by_app if app == POOLER), 0.0)
    head = "PgBouncer opens them: it closes its server connections"
    if churn.reasons:
        reason, n = churn.reasons[0]
        setting = LOG_REASONS.get(reason)
        said = f"`closing because: {reason}` {n:.0f} times in its log"
        if setting is not None:
            value = getattr(config, setting, None) if config is not None else None
            shown = f"{setting}={value:g} s" if value is not None else setting
            return f"{head} after {shown} ({said}): {SETTING_ADVICE[setting]}"
        return f"{head} ({said}): see why in PgBouncer's log"
    servers = max(churn.servers, 1)
    found = []
    for setting in ("server_lifetime", "server_idle_timeout"):
        value = getattr(config, setting, None) if config is not None else None
        if value is not None and value > 0 and servers * 60.0 / value >= EXPLAINS * rate:
            found.append(setting)
    if found and config is not None:
        settings = " and ".join(f"{name}={getattr(config, name):g} s" for name in found)
        return f"{head} after {settings}: " + "; ".join(SETTING_ADVICE[name] for name in found)
    return (
        f"{head} for another reason than its timeouts: follow PgBouncer's log (log_files) to see why "
        "(`closing because: ...`)"
    )


LOG_REASONS = {"server lifetime over": "server_lifetime", "server idle timeout": "server_idle_timeout"}
SETTING_ADVICE = {
    "server_lifetime": "raise server_lifetime (default 3600), which closes servers no client holds once that old",
    "server_idle_timeout": (
        "raise server_idle_timeout (default 600), which closes servers idle that long, or keep some with min_pool_size"
    ),
}


def conn_max_age_of(settings: Settings, app: str) -> float | None:
    """The application's CONN_MAX_AGE: its profile's, else the instance's (None: persistent)."""
    profile = profile_for(settings.apps, app)
    return profile.conn_max_age if profile is not None else settings.conn_max_age


def app_advice(apps: list[str], lifetimes: Mapping[str, float], settings: Settings) -> list[str]:
    """What to do, for each kind of application named: by what it has configured and how long its connections
    lived, never to set what is set."""
    pooled, short, aged, unset = [], [], [], []
    for app in apps:
        profile = profile_for(settings.apps, app)
        age = conn_max_age_of(settings, app)
        lived = lifetimes.get(app)
        if profile is not None and profile.pooled:
            pooled.append(app)
        elif age is not None and age <= 0:
            unset.append(app)
        elif age is None or lived is None or lived < age / 2:
            short.append(app)
        else:
            aged.append(app)
    advice = []
    if unset:
        advice.append("their connections do not outlive requests: set CONN_MAX_AGE (with CONN_HEALTH_CHECKS) or pool")
    if pooled:
        advice.append("a pool that replaces its connections: raise max_idle and max_lifetime, or min_size")
    advice += [short_lived(app, lifetimes.get(app), conn_max_age_of(settings, app)) for app in short]
    for app in aged:
        age = conn_max_age_of(settings, app)
        advice.append(f"app={app or 'none'}'s connections live their CONN_MAX_AGE={age:g} s: raise it, or pool")
    return advice


def short_lived(app: str, lived: float | None, age: float | None) -> str:
    """Connections that end far sooner than a CONN_MAX_AGE that is set: what ends them, and how long they lived
    where measured."""
    measured = f"lived about {_seconds(lived)} on average, far" if lived is not None else "end far"
    configured = "None (persistent)" if age is None else f"{age:g} s"
    return (
        f"app={app or 'none'}'s connections {measured} short of its CONN_MAX_AGE={configured}: processes that "
        "exit (gunicorn max_requests, Celery max_tasks_per_child, autoscaling) or code that closes connections "
        "(connection.close(), close_old_connections() outside requests) end them; recycle processes less often"
    )


def _seconds(value: float) -> str:
    return f"{value:.2g} s" if value < 10 else f"{value:.0f} s"
