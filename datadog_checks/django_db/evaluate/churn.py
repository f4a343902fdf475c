"""Churn: connections opened and closed again, over at least a minute of the check's own history, and which
applications open them. No I/O.

Opened connections minus the growth of the connection count: a deploy that opens 40 connections and keeps
them is no churn; CONN_MAX_AGE=0 under load is. Who opens them comes from the best source that spoke in
the window, per application, never from two at once:

- ``log``: PostgreSQL's ``connection authorized: ... application_name=...`` lines (``log_connections = on``,
  the server's log in ``log_files``): every connection, however short;
- ``django``: the processes' own counters (``django_metrics``), for an application the log does not name;
- ``sampled``: backends pg_stat_activity showed as started since the previous run: short connections are
  rarely caught there, so it names an application only when nothing better does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..config import Level, Settings
from ..profiles import profile_for
from .model import Finding, Status, level

WINDOW = 60.0  # seconds: the least history behind a churn verdict
SOURCES = ("log", "django", "sampled")  # the best first
SOURCE_NAMES = {"log": "the PostgreSQL log", "django": "the processes' counters", "sampled": "pg_stat_activity"}

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
    by_app: Mapping[str, int] = field(default_factory=dict)  # connections now, by application
    opened_by_app: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # source: {app: opened}


@dataclass(frozen=True)
class Churn:
    per_minute: float  # opened and closed again, a minute
    seconds: float  # the window it was counted over
    opened: float
    growth: float  # of the connection count over the window
    by_app: tuple[tuple[str, float, str], ...] = ()  # (app, churn a minute, source), the most first


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
        return Churn(per_minute, seconds, opened, growth, self._by_app(start, sample, seconds))

    def _by_app(self, start: Sample, end: Sample, seconds: float) -> tuple[tuple[str, float, str], ...]:
        later = self.samples[1:]
        figures: dict[str, tuple[float, str]] = {}
        for source in SOURCES:
            opened: Counter[str] = Counter()
            for s in later:
                opened.update(s.opened_by_app.get(source, {}))
            for app, n in opened.items():
                if app in figures:
                    continue  # a better source counted it
                growth = end.by_app.get(app, 0) - start.by_app.get(app, 0)
                figures[app] = (max(0.0, n - _stayed(growth)) * 60.0 / seconds, source)
        ranked = sorted(figures.items(), key=lambda item: (-item[1][0], item[0]))
        return tuple((app, rate, source) for app, (rate, source) in ranked if rate >= 0.5)


def churn_finding(churn: Churn, settings: Settings, threshold: Level, what: str = "connections") -> Finding:
    """The churn verdict: how many a minute and, where known, which applications with their share."""
    status = level(churn.per_minute, threshold)
    text = f"{churn.per_minute:.0f} {what} a minute opened and closed again (churn, over {churn.seconds:.0f} s)"
    named = [(app, rate, source) for app, rate, source in churn.by_app if settings.applications.allows(app)]
    if not named:
        if status != Status.OK:
            text += (
                ": no application named; to name them, turn on log_connections and follow PostgreSQL's log "
                "(log_files), or read the processes' counters (django_metrics)"
            )
        return Finding(status, text)
    total = max(churn.per_minute, sum(rate for _, rate, _ in named))
    sources = {source for _, _, source in named[:3]}
    parts = []
    for app, rate, source in named[:3]:
        part = f"app={app or 'none'} {rate:.0f} ({rate / total:.0%}"
        part += f", {SOURCE_NAMES[source]})" if len(sources) > 1 else ")"
        parts.append(part)
    if len(named) > 3:
        parts.append(f"{len(named) - 3} more")
    text += ": " + ", ".join(parts)
    if len(sources) == 1:
        text += f", by {SOURCE_NAMES[sources.pop()]}"
    pooled = [app for app, _, _ in named[:3] if (p := profile_for(settings.apps, app)) is not None and p.pooled]
    if pooled:
        text += "; a pool that replaces its connections: raise max_idle and max_lifetime, or min_size"
    else:
        text += "; their connections do not outlive requests: set CONN_MAX_AGE (with CONN_HEALTH_CHECKS) or pool"
    return Finding(status, text)
