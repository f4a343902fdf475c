"""The Django processes' own view: counters to rates per application, pool gauges, findings. No I/O.

Each endpoint's counters are turned into increases between two reads of that endpoint,
then summed per application and alias: the sum of rates, so one worker restarting (its
counters back to zero) never gives a negative rate. Findings look at the last minute.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ..records import DjangoAlias, DjangoPool, DjangoScrape, DjangoScrapeFailure
from ..settings import Level, Settings
from .churn import conn_max_age_of, short_lived
from .model import Finding, Metric, Status, Subject, crossed, level, tag_value

PREFIX = "django_db.django."
WINDOW = 60.0  # seconds of history behind the findings
POOL_GAUGES = ("size", "available", "max_size", "requests_waiting")


def increase(before: float | None, after: float | None) -> float:
    """How much a counter grew; a counter that went down was reset, and counts again from zero."""
    if after is None:
        return 0.0
    if before is None or after < before:
        return after
    return after - before


@dataclass(frozen=True)
class Growth:
    """What one alias's counters grew by between two reads of one endpoint."""

    new_connections: float = 0.0
    connection_errors: float = 0.0
    queries: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)
    pooled: bool = False  # the endpoint exposes this alias's pool
    pool_timeouts: float = 0.0
    pool_connections: float | None = None  # None: the pool's counter is not exposed

    @property
    def failed(self) -> float:
        """Connections that could not be opened: with a pool, django-prometheus also counts its timeouts."""
        return max(0.0, self.connection_errors - self.pool_timeouts) if self.pooled else self.connection_errors

    @property
    def opened(self) -> float:
        """Connections opened: a pool's own count where exposed (django-prometheus counts check-outs then),
        else the attempts that did not fail (django-prometheus counts an attempt before connecting)."""
        if self.pool_connections is not None:
            return self.pool_connections
        return max(0.0, self.new_connections - self.connection_errors)


@dataclass(frozen=True)
class Interval:
    """One endpoint between two reads."""

    url: str
    app: str
    start: float
    end: float
    growth: dict[str, Growth]  # by alias

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-3)


def interval(before: DjangoScrape, after: DjangoScrape) -> Interval:
    old = {a.alias: a for a in before.aliases}
    old_pools = {p.alias: p for p in before.pools}
    pools = {p.alias: p for p in after.pools}
    growth = {}
    for alias in sorted({a.alias for a in after.aliases} | set(pools)):
        now = next((a for a in after.aliases if a.alias == alias), DjangoAlias(alias))
        then = old.get(alias, DjangoAlias(alias))
        pool, old_pool = pools.get(alias, DjangoPool(alias)), old_pools.get(alias, DjangoPool(alias))
        errors_then = dict(then.errors)
        growth[alias] = Growth(
            new_connections=increase(then.new_connections, now.new_connections),
            connection_errors=increase(then.connection_errors, now.connection_errors),
            queries=increase(then.queries, now.queries),
            errors={kind: increase(errors_then.get(kind), n) for kind, n in now.errors},
            pooled=alias in pools,
            pool_timeouts=increase(old_pool.timeouts, pool.timeouts),
            pool_connections=None if pool.connections is None else increase(old_pool.connections, pool.connections),
        )
    return Interval(after.url, after.app, before.time, after.time, growth)


@dataclass
class DjangoRun:
    """One run's reads, with what the history adds to them."""

    scrapes: list[DjangoScrape]
    failures: list[DjangoScrapeFailure]
    intervals: list[Interval]  # this run's, one per endpoint read now and before
    window: list[Interval]  # every interval that ended within the last minute, this run's included
    previous: dict[str, DjangoScrape]  # the reads before this run's, by URL


@dataclass
class DjangoHistory:
    """The last read of each endpoint and a minute of intervals; rebuilt from nothing after a restart."""

    last: dict[str, DjangoScrape] = field(default_factory=dict)
    recent: list[Interval] = field(default_factory=list)

    def update(self, results: Iterable[DjangoScrape | DjangoScrapeFailure]) -> DjangoRun:
        scrapes = [r for r in results if isinstance(r, DjangoScrape)]
        failures = [r for r in results if isinstance(r, DjangoScrapeFailure)]
        previous = dict(self.last)
        intervals = [interval(previous[s.url], s) for s in scrapes if s.url in previous]
        for scrape in scrapes:
            self.last[scrape.url] = scrape
        now = max((s.time for s in scrapes), default=None)
        if now is not None:
            self.recent = [i for i in [*self.recent, *intervals] if i.end > now - WINDOW]
        return DjangoRun(scrapes, failures, intervals, list(self.recent), previous)


def _tags(app: str, alias: str, base: tuple[str, ...]) -> tuple[str, ...]:
    return (f"app:{tag_value(app)}", f"alias:{tag_value(alias)}", *base)


def pool_sums(scrapes: Iterable[DjangoScrape]) -> dict[tuple[str, str], dict[str, float]]:
    """Pool gauges summed per (app, alias) over the endpoints that expose them."""
    sums: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for scrape in scrapes:
        for pool in scrape.pools:
            for name in POOL_GAUGES:
                value = getattr(pool, name)
                if value is not None:
                    sums[scrape.app, pool.alias][name] = sums[scrape.app, pool.alias].get(name, 0.0) + value
    return sums


def django_metrics(run: DjangoRun, tags: Iterable[str] = ()) -> list[Metric]:
    """Rates per second summed per application and alias; pool gauges; nothing per endpoint."""
    base = tuple(tags)
    rates: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    errors: dict[tuple[str, str, str], float] = defaultdict(float)
    for i in run.intervals:
        for alias, g in i.growth.items():
            key = (i.app, alias)
            rates[key]["new_connections"] += g.new_connections / i.seconds
            rates[key]["connection_errors"] += g.connection_errors / i.seconds
            rates[key]["queries"] += g.queries / i.seconds
            if g.pooled:
                rates[key]["pool.timeouts"] += g.pool_timeouts / i.seconds
            if g.pool_connections is not None:
                rates[key]["pool.new_connections"] += g.pool_connections / i.seconds
            for kind, n in g.errors.items():
                errors[i.app, alias, kind] += n / i.seconds
    metrics = [
        Metric("gauge", PREFIX + name, value, _tags(app, alias, base))
        for (app, alias), values in sorted(rates.items())
        for name, value in values.items()
    ]
    metrics += [
        Metric("gauge", PREFIX + "errors", value, (*_tags(app, alias, base), f"type:{tag_value(kind)}"))
        for (app, alias, kind), value in sorted(errors.items())
    ]
    metrics += [
        Metric("gauge", PREFIX + "pool." + name, value, _tags(app, alias, base))
        for (app, alias), values in sorted(pool_sums(run.scrapes).items())
        for name, value in values.items()
    ]
    return metrics


def _n(value: float) -> str:
    return f"{value:.0f}"


def django_findings(
    run: DjangoRun, churn_per_minute: Level, named: Collection[str] = (), settings: Settings | None = None
) -> list[Finding]:
    """Churn and failed connections per application over the last minute; pool waits and timeouts.

    ``named``: applications the server's churn verdict names already: their churn is not told twice.
    ``settings``: the applications' CONN_MAX_AGE, so that the advice never asks to set what is set."""
    findings = []
    by_app: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    pooled: set[str] = set()
    timeouts: dict[tuple[str, str], float] = defaultdict(float)
    start: dict[str, float] = {}
    end: dict[str, float] = {}
    for i in run.window:
        start[i.app] = min(start.get(i.app, i.start), i.start)
        end[i.app] = max(end.get(i.app, i.end), i.end)
        for alias, g in i.growth.items():
            by_app[i.app]["opened"] += g.opened
            by_app[i.app]["attempts"] += g.new_connections
            by_app[i.app]["failed"] += g.failed
            if g.pooled:
                pooled.add(i.app)
                timeouts[i.app, alias] += g.pool_timeouts
    for app, figures in sorted(by_app.items()):
        span = end[app] - start[app]
        # A count over the last minute: bursts shorter than a minute are not stretched into a rate.
        per_minute = figures["opened"] * WINDOW / max(span, WINDOW)
        if app not in named:
            age = conn_max_age_of(settings, app) if settings is not None else 0.0
            if app in pooled:
                advice = "the pool replaces its connections too often: raise max_idle and max_lifetime, or min_size"
            elif age is None or age > 0:
                advice = short_lived(app, None, age)
            else:
                advice = (
                    "its connections do not outlive requests: set CONN_MAX_AGE (with CONN_HEALTH_CHECKS) or use a pool"
                )
            status = level(per_minute, churn_per_minute)
            findings.append(
                Finding(
                    "connection_churn",
                    status,
                    f"app={app} opened {_n(per_minute)} new connections a minute, by its processes' own counters",
                    advice,
                    (Subject((f"app:{tag_value(app)}",), per_minute),),
                    per_minute,
                    crossed(churn_per_minute, status),
                )
            )
        if figures["failed"]:
            findings.append(
                Finding(
                    "connection_failures",
                    Status.WARNING,
                    f"app={app} failed to open {_n(figures['failed'])} connections in the last minute "
                    f"(of {_n(figures['attempts'])} attempts)",
                    "its processes cannot reach the database (refused, full, DNS, TLS or credentials); "
                    "django_db.errors by signature and the can_connect checks say which",
                    (Subject((f"app:{tag_value(app)}",), figures["failed"]),),
                    figures["failed"],
                )
            )
    for (app, alias), n in sorted(timeouts.items()):
        if n:
            findings.append(
                Finding(
                    "pool_timeouts",
                    Status.WARNING,
                    f"app={app} got no connection from its pool ({alias}) {_n(n)} times in the last minute "
                    f"(PoolTimeout)",
                    "raise OPTIONS['pool']['max_size'] within the server's free slots, "
                    "or shorten what holds connections",
                    (Subject((f"app:{tag_value(app)}", f"alias:{tag_value(alias)}"), n),),
                    n,
                )
            )
    before = pool_sums(run.previous.values())
    for (app, alias), now in sorted(pool_sums(run.scrapes).items()):
        waiting = now.get("requests_waiting", 0.0)
        if waiting and before.get((app, alias), {}).get("requests_waiting", 0.0):
            findings.append(
                Finding(
                    "pool_requests_waiting",
                    Status.WARNING,
                    f"app={app} has {_n(waiting)} requests waiting for a pool connection ({alias}; "
                    f"{_n(now.get('size', 0.0))} open of max_size {_n(now.get('max_size', 0.0))}, "
                    f"{_n(now.get('available', 0.0))} available), two runs in a row",
                    "raise OPTIONS['pool']['max_size'] within the server's free slots, or shorten transactions",
                    (Subject((f"app:{tag_value(app)}", f"alias:{tag_value(alias)}"), waiting),),
                    waiting,
                )
            )
    return findings


# A page that failed twice with a server error (sources/django_metrics.py reads it again once).
SERVER_ERROR_ADVICE = (
    "the application failed to serve the page: its own log says why. In prometheus_client's multiprocess mode, "
    "a file of 0 bytes in PROMETHEUS_MULTIPROC_DIR (left by a worker killed as it started) fails every read "
    "until it is removed"
)


def failure_text(failure: DjangoScrapeFailure) -> str:
    """The message of the endpoint's own service check: what failed and what to do."""
    advice = {
        "connection_refused": "check that the process runs and exports on that port "
        "(PROMETHEUS_METRICS_EXPORT_PORT_RANGE gives each gunicorn worker the next free port)",
        "connect_timeout": "the process accepted but did not answer in time: it may be stuck or overloaded",
        "tls_error": "check tls_verify, tls_ca_cert and the endpoint's certificate",
        "http_status": "check the URL's path, and headers or auth_type if the endpoint is protected",
        "bad_exposition": "the URL does not serve Prometheus text: point it at django-prometheus's /metrics",
    }.get(failure.problem, "read the Agent's log for the error")
    if failure.problem == "http_status" and failure.detail.startswith("HTTP 5"):
        advice = SERVER_ERROR_ADVICE
    return f"Django metrics {failure.url} (app={failure.app}): {failure.detail}. {advice[0].upper()}{advice[1:]}."
