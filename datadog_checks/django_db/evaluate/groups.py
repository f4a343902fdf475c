"""What PostgreSQL's and MySQL's connection groups share: which the user asked to see, how values of a
client-chosen dimension fold into ``other`` past ``max_tag_values``, and how full a server is. No I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeVar

from ..settings import Settings

OTHER = "other"


class Group(Protocol):
    """A group of connections as a source counts them, a NamedTuple (``fold`` calls its ``_replace``): its dimensions
    are string fields."""

    @property
    def db(self) -> str: ...

    @property
    def count(self) -> int: ...


G = TypeVar("G", bound=Group)
N = TypeVar("N", int, float)


def select(groups: Iterable[G], settings: Settings) -> list[G]:
    """The groups the user asked to see, by database name and, where a group has one, application name."""
    apps, databases = settings.applications, settings.databases
    if apps.everything and databases.everything:
        return list(groups)
    return [g for g in groups if databases.allows(g.db) and (not hasattr(g, "app") or apps.allows(g.app))]


def fold(groups: list[G], dimensions: Iterable[str], limit: int) -> tuple[list[G], dict[str, list[str]]]:
    """Keep the ``limit`` largest values of each dimension; the rest become ``other``.

    Returns the groups with folded values and, per dimension, the values folded away.
    """
    folded: dict[str, list[str]] = {}
    if len(groups) <= limit:
        return groups, folded  # no dimension can have more values than there are groups
    for dimension in dimensions:
        sizes: Counter[str] = Counter()
        for group in groups:
            sizes[getattr(group, dimension)] += group.count
        if len(sizes) <= limit:
            continue
        ranked = sorted(sizes, key=lambda value: (-sizes[value], value))
        kept = set(ranked[:limit])
        folded[dimension] = sorted(ranked[limit:])
        changed: dict[str, Any] = {dimension: OTHER}
        groups = [g if getattr(g, dimension) in kept else g._replace(**changed) for g in groups]  # type: ignore[attr-defined]
    return groups, folded


def ranked(counts: Mapping[str, N]) -> list[tuple[str, N]]:
    """Values with their counts, the largest first and, between equals, by name: the one order every listing
    and every choice of what to keep uses."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def ratio(used: float, limit: float) -> float:
    """How full a server is: ``used`` over ``limit``, and full where there is no room at all."""
    return used / limit if limit else 1.0
