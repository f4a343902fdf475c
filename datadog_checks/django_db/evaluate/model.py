"""Plain values passed from the evaluation to the check: metrics and findings."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    from ..config import Level

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


class Finding(NamedTuple):
    status: Status
    text: str

    def line(self) -> str:
        return f"{self.status.name}: {self.text}"


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


def message(findings: list[Finding]) -> str:
    """Every finding, worst first; findings of one status keep the order they were found in."""
    ordered = sorted(findings, key=lambda f: -f.status)
    return "; ".join(f.line() for f in ordered if f.status != Status.OK)
