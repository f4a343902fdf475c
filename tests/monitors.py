"""The shipped monitors, evaluated as Datadog evaluates them on the series a check sent over a few runs.

A metric monitor ``time(last_N):space:metric{scope} by {keys} > threshold``: the series the scope keeps, a
series lacking one of the group-by tags left out (as Datadog leaves it out), aggregated across the group's
series in each run (space), then across the runs (time), compared with the critical and the warning
threshold of its options. The scope is comma-separated terms, each ``*``, ``key:value``, ``!key:value`` or
``key:a OR key:b``. A service check monitor ``"name".over("*").by("key").last(N).count_by_status()`` alerts
when the last ``critical`` statuses of a group are all CRITICAL. A forecast is taken flat: the runs span
seconds, so a slope fitted to them says nothing about tomorrow; its inner query is compared as it stands.
"""

from __future__ import annotations

import json
import operator
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

MONITORS = Path(__file__).resolve().parent.parent / "assets" / "monitors"

METRIC = re.compile(
    r"^(?P<time>avg|sum|min|max)\(last_\w+\):(?P<space>avg|sum|min|max):(?P<metric>[\w.]+)"
    r"\{(?P<scope>[^}]*)\}(?: by \{(?P<by>[^}]*)\})?(?P<count>\.as_count\(\))? (?P<op>>=|>) (?P<threshold>[\d.]+)$"
)
FORECAST = re.compile(
    r"^max\(next_\w+\):forecast\((?P<space>avg|sum|min|max):(?P<metric>[\w.]+)\{(?P<scope>[^}]*)\}"
    r"(?: by \{(?P<by>[^}]*)\})?, .*\) (?P<op>>=|>) (?P<threshold>[\d.]+)$"
)
SERVICE = re.compile(
    r'^"(?P<check>[\w.]+)"\.over\("\*"\)\.by\((?P<by>[^)]*)\)\.last\((?P<last>\d+)\)\.count_by_status\(\)$'
)
SPACE = {"sum": sum, "max": max, "min": min, "avg": mean}
OPS = {">": operator.gt, ">=": operator.ge}
CRITICAL = 2


@dataclass
class Run:
    """What one run of a check sent: (metric, value, tags) and (service check, status, tags)."""

    metrics: list[tuple[str, float, tuple[str, ...]]] = field(default_factory=list)
    service_checks: list[tuple[str, int, tuple[str, ...]]] = field(default_factory=list)


def recorded(aggregator) -> Run:
    """The run the aggregator holds."""
    run = Run()
    for name in aggregator.metric_names:
        run.metrics += [(name, m.value, tuple(m.tags)) for m in aggregator.metrics(name)]
    for name in aggregator.service_check_names:
        run.service_checks += [(name, s.status, tuple(s.tags)) for s in aggregator.service_checks(name)]
    return run


def tag_keys(text: str | None) -> list[str]:
    """The keys of a ``by {...}`` or ``.by(...)`` list, or the terms of a scope, in order, ``*`` left out."""
    return [key for part in (text or "").split(",") if (key := part.strip().strip("\"'")) not in ("", "*")]


def _term_holds(term: str, tags: set[str]) -> bool:
    if term == "*":
        return True
    if term.startswith("!"):
        return term[1:] not in tags
    return any(part.strip() in tags for part in term.split(" OR "))


def in_scope(scope: str, tags: tuple[str, ...]) -> bool:
    have = set(tags)
    return all(_term_holds(term.strip(), have) for term in scope.split(","))


def group_of(by: list[str], tags: tuple[str, ...]) -> tuple[str, ...] | None:
    """The group's tags (``key:value`` per group-by key), or None where a key is missing."""
    values = {}
    for tag in tags:
        key, _, value = tag.partition(":")
        values.setdefault(key, value)
    if any(key not in values for key in by):
        return None
    return tuple(f"{key}:{values[key]}" for key in by)


@dataclass(frozen=True)
class Monitor:
    name: str
    query: str
    critical: float
    warning: float | None

    def evaluate(self, runs: list[Run]) -> dict[tuple[str, ...], str]:
        """Each group that fires: ``Alert`` past critical, ``Warn`` past warning."""
        if match := SERVICE.match(self.query):
            return self._service_check(match, runs)
        match = METRIC.match(self.query) or FORECAST.match(self.query)
        assert match, f"{self.name}: a query this evaluator cannot read: {self.query}"
        assert float(match["threshold"]) == self.critical, f"{self.name}: the query's threshold is not critical's"
        by = tag_keys(match["by"])
        per_run: list[dict[tuple[str, ...], float]] = []
        for run in runs:
            groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
            for name, value, tags in run.metrics:
                if name != match["metric"] or not in_scope(match["scope"], tags):
                    continue
                group = group_of(by, tags)
                if group is not None:
                    groups[group].append(value)
            per_run.append({group: SPACE[match["space"]](values) for group, values in groups.items()})
        time_agg = SPACE[match.groupdict().get("time") or "max"]
        compare = OPS[match["op"]]
        fired = {}
        for group in {g for values in per_run for g in values}:
            value = time_agg([values[group] for values in per_run if group in values])
            if compare(value, self.critical):
                fired[group] = "Alert"
            elif self.warning is not None and compare(value, self.warning):
                fired[group] = "Warn"
        return fired

    def _service_check(self, match: re.Match, runs: list[Run]) -> dict[tuple[str, ...], str]:
        by = tag_keys(match["by"])
        statuses: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for run in runs:
            for name, status, tags in run.service_checks:
                group = group_of(by, tags)
                if name == match["check"] and group is not None:
                    statuses[group].append(status)
        fired = {}
        for group, seen in statuses.items():
            last = seen[-int(match["last"]) :]
            if len(last) >= self.critical and all(s == CRITICAL for s in last[-int(self.critical) :]):
                fired[group] = "Alert"
        return fired


def shipped() -> list[Monitor]:
    monitors = []
    for path in sorted(MONITORS.glob("*.json")):
        definition = json.loads(path.read_text())["definition"]
        thresholds = definition["options"]["thresholds"]
        monitors.append(Monitor(path.stem, definition["query"], thresholds["critical"], thresholds.get("warning")))
    return monitors


def fired(runs: list[Run]) -> dict[str, dict[tuple[str, ...], str]]:
    """monitor: the groups it fires for, over ``runs``; monitors that fire for none left out."""
    found = {}
    for monitor in shipped():
        groups = monitor.evaluate(runs)
        if groups:
            found[monitor.name] = groups
    return found
