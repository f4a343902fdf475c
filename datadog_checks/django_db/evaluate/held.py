"""Findings from errors held for a while after their last line, and restarts: no I/O.

A fault that goes on (a page that fails on every visit) writes a line now and then: the finding stays until
``finding_hold_seconds`` after its last line, so connection_health and django_db.finding do not flap. A restart
of a server breaks the connections its clients kept: the advice for their errors in the window after it is how
to survive a restart, not an idle timeout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from .model import Finding, Status

# What the clients of a restarted server report in the window after it.
AFTER_RESTART = frozenset(
    {"server_closed", "connection_refused", "admin_shutdown", "mysql_server_gone", "connection_failed"}
)
RESTARTED = "server_restarted"


Seen = list[tuple[str, str, str]]  # (signature, source, server tag) of the errors met in a run


class Held:
    """What each signature's last run with a log line saw (its lines and the applications they named), and when:
    a held finding is told again from them each run, with the advice today's servers call for. The check's own
    connections' errors are not held: each run reads those servers again."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, Seen, Counter[str]]] = {}

    def hold(
        self, seen: Seen, apps: Mapping[str, Counter[str]], now: float, seconds: float
    ) -> tuple[Seen, dict[str, Counter[str]], dict[str, float]]:
        """The errors of signatures this run did not see whose last line is under ``seconds`` old, the
        applications their lines named, and how long ago by signature; this run's are kept."""
        if not seen and not self.last:
            return [], {}, {}
        this_run: dict[str, Seen] = {}
        for entry in seen:  # the logs' lines: a server the check reads says again each run what it says
            if entry[1] == "log":
                this_run.setdefault(entry[0], []).append(entry)
        for name, entries in this_run.items():
            self.last[name] = (now, entries, Counter(apps.get(name, Counter())))
        held: Seen = []
        held_apps: dict[str, Counter[str]] = {}
        ages: dict[str, float] = {}
        seen_now = {entry[0] for entry in seen}
        for name, (at, entries, named) in list(self.last.items()):
            if name in seen_now:
                continue
            if now - at >= seconds:
                del self.last[name]
                continue
            held += entries
            if named:
                held_apps[name] = named
            ages[name] = now - at
        return held, held_apps, ages


def said_ago(findings: list[Finding], ages: Mapping[str, float]) -> list[Finding]:
    """Held findings say when their last line was."""
    return [
        f._replace(text=f.text.replace(" seen (", f" seen {ages[f.code]:.0f} s ago (", 1)) if f.code in ages else f
        for f in findings
    ]


def restarted(server: str, label: str, how: str) -> Finding:
    """A note: the server restarted, as the check found it."""
    return Finding(RESTARTED, Status.OK, f"{label} restarted ({how})", server=server)


def after_restart(findings: list[Finding], restarts: Mapping[str, float]) -> list[Finding]:
    """The advice of the clients' errors in a restart's window (``restarts``: the server's label, seconds since):
    how the application survives a restart."""
    if not restarts:
        return findings
    label, ago = min(restarts.items(), key=lambda item: item[1])
    advice = (
        f"{label} restarted {ago:.0f} s ago, breaking the connections kept from before it: set CONN_HEALTH_CHECKS = "
        "True in Django's DATABASES entry, so that a kept connection is tested before a request uses it and "
        "replaced if broken, and let the other clients reconnect"
    )
    return [f._replace(advice=advice) if f.code in AFTER_RESTART else f for f in findings]
