"""An application gone quiet keeps its connections by design: they are no leak.

Django closes an expired persistent connection (CONN_MAX_AGE) only when a request starts or ends: when the
requests stop, every connection the application keeps stays idle until its next request. An application is quiet
for as long as none of its connections has been used: the youngest idle time among them (0 while one is in use,
in a transaction or waiting). A connection is its leak when it was idle past the leak threshold before the
application went quiet, that is idle longer than the threshold plus the quiet time. While the application serves,
that is the threshold itself: a connection idle while the same application goes on with others is a leak, during
the traffic and after it.

The monitoring sessions (this check's other instances, Datadog's own ``postgres`` check) are never an
application's: no leak, budget or timeout is theirs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from .evaluate.model import Finding, Status, Subject, tag_value
from .records import Quiet
from .settings import APPLICATION_NAME, AppProfile, profile_for

# application_name of monitoring sessions: this check's (its other instances) and Datadog's postgres check's.
MONITORING_APPS = frozenset({APPLICATION_NAME, "datadog-agent"})


def is_monitoring(app: str) -> bool:
    return app in MONITORING_APPS


def may_be_quiet(apps: tuple[AppProfile, ...], app: str, held: int) -> bool:
    """Whether an application's idle connections may be kept by it gone quiet: not past its profile's budget."""
    profile = profile_for(apps, app)
    return profile is None or profile.max_connections is None or held <= profile.max_connections


def youngest(ages: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Each one's youngest idle time from (who, idle seconds, 0 when in use) of its connections or groups."""
    found: dict[str, float] = {}
    for who, age in ages:
        found[who] = min(found.get(who, age), max(0.0, age))
    return found


class LastUse:
    """When the check saw each application (MySQL user) last use a connection, by the clock its server gives.

    Only an application whose last use the check saw is excused as quiet: connections the check never saw in use
    (it started after them, or they were idle past the threshold when it first looked) stay leaks."""

    SLACK = 1.0  # seconds: PgBouncer's times are whole seconds
    LIMIT = 4096  # names are client-chosen: the memory is bounded

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def quiet(self, ages: dict[str, float], threshold: Callable[[str], float | None], now: float) -> dict[str, float]:
        """The quiet times (their youngest idle time, ``ages``) of those whose last use the check saw; this run's
        uses, within their leak threshold, are kept for the next runs."""
        at = self.at
        found = {who: age for who, age in ages.items() if age > 0 and at.get(who, -math.inf) >= now - age - self.SLACK}
        if len(at) > self.LIMIT:
            at.clear()
        for who, age in ages.items():
            limit = threshold(who)
            if limit is not None and age <= limit:
                at[who] = now - age
        return found


QUIET = "app_quiet"


def quiet_findings(quiet: Iterable[Quiet], where: str = "", label: str = "app") -> list[Finding]:
    """What the check saw where it held its tongue: OK notes, said in the health message."""
    found = []
    for q in quiet:
        n = q.kept
        text = (
            f"{label}={q.who or 'none'} quiet for {q.seconds:.0f} s, {n} connection{'s' if n != 1 else ''}{where} "
            "kept idle until its next request (CONN_MAX_AGE), no leak"
        )
        found.append(Finding(QUIET, Status.OK, text, subjects=(Subject((f"{label}:{tag_value(q.who)}",), n),)))
    return found
