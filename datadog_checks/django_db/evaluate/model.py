"""Plain values passed from the evaluation to the check: metrics and findings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, Literal, NamedTuple

from .groups import OTHER, ranked

if TYPE_CHECKING:
    from ..settings import Level

Kind = Literal["gauge", "rate", "count", "monotonic_count"]


class Metric(NamedTuple):
    kind: Kind
    name: str
    value: float
    tags: tuple[str, ...] = ()


class Status(IntEnum):
    """Service check statuses, ordered by severity (UNKNOWN is not a finding's status)."""

    OK = 0
    WARNING = 1
    CRITICAL = 2


class Subject(NamedTuple):
    """Who a finding is about, as tags (``app:web``, ``pgbouncer_db:appdb``, ``log_file:/var/log/x``), with its
    share of the finding's figure where it has one."""

    tags: tuple[str, ...]
    figure: float | None = None


class Finding(NamedTuple):
    """One thing the run found, as data: a stable ``code`` (listed in the README), how bad, what was measured
    and about whom. ``text`` states the fact with its figures; ``advice`` what to do. The message line is
    rendered from these at submission (``line``); ``subjects`` and ``server`` tag django_db.finding."""

    code: str
    status: Status
    text: str
    advice: str = ""
    subjects: tuple[Subject, ...] = ()
    figure: float | None = None
    threshold: float | None = None
    server: str = ""

    def sentence(self) -> str:
        """The fact, then what to do."""
        return f"{self.text}: {self.advice}" if self.advice else self.text

    def line(self) -> str:
        return f"{self.status.name}: {self.sentence()}"


def subjects_by(key: str, counts: Mapping[str, float]) -> tuple[Subject, ...]:
    """One subject per value of a tag (``none`` for an empty one), largest first."""
    return tuple(Subject((f"{key}:{tag_value(value)}",), n) for value, n in ranked(counts))


def app_subjects(counts: Mapping[str, float]) -> tuple[Subject, ...]:
    """One subject per application (``app:none`` for an empty name), largest first."""
    return subjects_by("app", counts)


def for_app(finding: Finding, app: str) -> Finding:
    """A finding about one application's profile: named in the text, and its subject."""
    return finding._replace(text=f"app={app}: {finding.text}", subjects=(Subject((f"app:{tag_value(app)}",)),))


def crossed(threshold: Level, status: Status) -> float | None:
    """The threshold a status was earned against: critical for CRITICAL, warning for WARNING."""
    if status == Status.CRITICAL:
        return threshold.critical
    if status == Status.WARNING:
        return threshold.warning
    return None


FINDING = "django_db.finding"


def finding_metrics(findings: Iterable[Finding], limit: int, tags: Sequence[str] = ()) -> list[Metric]:
    """``django_db.finding``: one series per active non-OK finding and subject, 1 for WARNING, 2 for CRITICAL.

    A finding's subjects past the ``limit`` largest fold into one ``other`` subject, as every client-chosen
    tag value does; where two findings give the same series, the worse one stands."""
    series: dict[tuple[str, ...], int] = {}
    for finding in findings:
        if finding.status == Status.OK:
            continue
        server = (finding.server,) if finding.server else ()
        for subject in fold_subjects(finding.subjects, limit) or (Subject(()),):
            key = (f"finding:{finding.code}", *subject.tags, *server, *tags)
            series[key] = max(series.get(key, 0), int(finding.status))
    return [Metric("gauge", FINDING, value, key) for key, value in series.items()]


def fold_subjects(subjects: Sequence[Subject], limit: int) -> tuple[Subject, ...]:
    """The ``limit`` largest subjects as they are; the rest as one subject of each kind folded (its tag names:
    ``app``, ``pooler`` ...) whose tag values are ``other``: an application folds into ``app:other``, never into
    another kind's name."""
    if len(subjects) <= limit:
        return tuple(subjects)
    ranked = sorted(subjects, key=lambda s: -(s.figure or 0.0))
    folded: dict[tuple[str, ...], float] = {}
    for subject in ranked[limit:]:
        kind = tuple(f"{tag.partition(':')[0]}:{OTHER}" for tag in subject.tags)
        folded[kind] = folded.get(kind, 0.0) + (subject.figure or 0.0)
    return (*ranked[:limit], *(Subject(tags, figure) for tags, figure in folded.items()))


def level(value: float, threshold: Level) -> Status:
    """The status a value earns against its warning and critical thresholds."""
    if threshold.critical is not None and value >= threshold.critical:
        return Status.CRITICAL
    if threshold.warning is not None and value >= threshold.warning:
        return Status.WARNING
    return Status.OK


def tag_value(value: str) -> str:
    """A tag value Datadog keeps as written: no commas, no line breaks."""
    return value.replace(",", "_").replace("\n", " ").strip() or "none"


def worst(findings: list[Finding]) -> Status:
    return max((f.status for f in findings), default=Status.OK)


# OK findings said beside the others: what the check saw where it held its tongue, a restart it found. An OK
# service check carries no message (the Agent's rule): they are said when something else is not OK, and logged.
NOTES = frozenset({"app_quiet", "server_restarted"})  # quiet.QUIET, held.RESTARTED


def message(findings: list[Finding]) -> str:
    """Every finding, worst first, then the notes while any is not OK; findings of one status keep their order."""
    ordered = sorted(findings, key=lambda f: -f.status)
    if not any(f.status != Status.OK for f in ordered):
        return ""
    return "; ".join(f.line() for f in ordered if f.status != Status.OK or f.code in NOTES)
