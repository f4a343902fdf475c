"""The instance configuration, checked once at start.

Every mistake raises ``ConfigurationError`` naming the key and the value at fault.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datadog_checks.base import ConfigurationError

DIMENSIONS = ("db", "user", "app", "client_addr")
DEFAULT_GROUP_BY = ("db", "user", "app")
DEFAULT_TIMEOUT = 5.0
DEFAULT_LOG_MAX_BYTES = 1024 * 1024
DJANGO_DEFAULT_CONN_MAX_AGE = 0.0

# name: (warning, critical); the fields of Thresholds
DEFAULT_THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "utilization": (0.8, 0.9),
    "pgbouncer_client_utilization": (0.8, 0.9),
    "idle_in_transaction_seconds": (30, 300),
    "idle_in_transaction_count": (None, 50),
    "leaked_connections": (1, None),
    "pgbouncer_maxwait_seconds": (1, 5),
    "churn_per_minute": (100, None),
}

POSTGRES_KEYS = {
    "host", "port", "username", "password", "dbname", "sslmode", "sslrootcert", "sslcert", "sslkey",
    "connect_timeout", "query_timeout",
}  # fmt: skip
PGBOUNCER_KEYS = {"host", "port", "username", "password", "sslmode", "connect_timeout", "query_timeout"}
SSL_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")
SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


@dataclass(frozen=True)
class Endpoint:
    kind: str  # postgres or pgbouncer
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    dbname: str
    connect_timeout: float
    query_timeout: float
    ssl: Mapping[str, str]

    @property
    def server_tag(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tag(self) -> str:
        """``postgres_server:<host>:<port>`` or ``pgbouncer_server:<host>:<port>``."""
        return f"{self.kind}_server:{self.server_tag}"


@dataclass(frozen=True)
class Level:
    warning: float | None
    critical: float | None


@dataclass(frozen=True)
class Thresholds:
    utilization: Level
    pgbouncer_client_utilization: Level
    idle_in_transaction_seconds: Level
    idle_in_transaction_count: Level
    leaked_connections: Level
    pgbouncer_maxwait_seconds: Level
    churn_per_minute: Level


@dataclass(frozen=True)
class NameFilter:
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()

    def allows(self, name: str) -> bool:
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)


@dataclass(frozen=True)
class Settings:
    postgres: Endpoint | None
    pgbouncer: Endpoint | None
    conn_max_age: float | None  # None: persistent connections
    leak_idle_seconds: float
    applications: NameFilter
    databases: NameFilter
    group_by: tuple[str, ...]
    max_tag_values: int
    thresholds: Thresholds
    log_files: tuple[str, ...]
    log_max_bytes_per_run: int
    report_leak_queries: bool
    emit_otel_metrics: bool
    tags: tuple[str, ...]


def _fail(key: str, value: Any, why: str) -> ConfigurationError:
    return ConfigurationError(f"`{key}`: {why} (got {value!r})")


def _number(key: str, value: Any, minimum: float = 0.0, allow_equal: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _fail(key, value, "must be a number")
    try:
        number = float(value)
    except ValueError:
        raise _fail(key, value, "must be a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise _fail(key, value, "must be a finite number")
    if number < minimum or (not allow_equal and number == minimum):
        raise _fail(key, value, f"must be {'at least' if allow_equal else 'greater than'} {minimum:g}")
    return number


def _integer(key: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise _fail(key, value, "must be a whole number")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise _fail(key, value, f"must be {bound}")
    return number


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, value, "must be a non-empty string")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "must be true or false")
    return value


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(key, value, "must be a list of strings")
    return tuple(value)


def _mapping(key: str, value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(key, value, "must be a mapping")
    return value


def _unknown_keys(key: str, section: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigurationError(f"`{key}`: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")


def _endpoint(key: str, raw: Any, default_port: int, known: set[str], dbname: str | None) -> Endpoint | None:
    if raw is None:
        return None
    section = _mapping(key, raw)
    _unknown_keys(key, section, known)
    ssl = {}
    for name in SSL_KEYS:
        if name in section and name in known:
            ssl[name] = _string(f"{key}.{name}", section[name])
    if "sslmode" in ssl and ssl["sslmode"] not in SSLMODES:
        raise _fail(f"{key}.sslmode", ssl["sslmode"], f"must be one of {', '.join(sorted(SSLMODES))}")
    return Endpoint(
        kind=key,
        host=_string(f"{key}.host", section.get("host", "localhost")),
        port=_integer(f"{key}.port", section.get("port", default_port), 1, 65535),
        username=_string(f"{key}.username", section.get("username", "datadog")),
        password=str(section.get("password") or ""),
        dbname=dbname or _string(f"{key}.dbname", section.get("dbname", "postgres")),
        connect_timeout=_number(f"{key}.connect_timeout", section.get("connect_timeout", DEFAULT_TIMEOUT), 0, False),
        query_timeout=_number(f"{key}.query_timeout", section.get("query_timeout", DEFAULT_TIMEOUT), 0, False),
        ssl=ssl,
    )


def _name_filter(key: str, raw: Any) -> NameFilter:
    section = _mapping(key, raw)
    _unknown_keys(key, section, {"include", "exclude"})
    compiled: dict[str, tuple[re.Pattern[str], ...]] = {}
    for part in ("include", "exclude"):
        patterns = []
        for index, pattern in enumerate(_strings(f"{key}.{part}", section.get(part))):
            try:
                patterns.append(re.compile(pattern))
            except re.error as e:
                raise _fail(f"{key}.{part}[{index}]", pattern, f"is not a regular expression: {e}") from None
        compiled[part] = tuple(patterns)
    return NameFilter(compiled["include"], compiled["exclude"])


def _thresholds(raw: Any) -> Thresholds:
    section = _mapping("thresholds", raw)
    _unknown_keys("thresholds", section, set(DEFAULT_THRESHOLDS))
    levels = {}
    for name, (warning, critical) in DEFAULT_THRESHOLDS.items():
        given = _mapping(f"thresholds.{name}", section.get(name))
        _unknown_keys(f"thresholds.{name}", given, {"warning", "critical"})
        if "warning" in given:
            warning = None if given["warning"] is None else _number(f"thresholds.{name}.warning", given["warning"])
        if "critical" in given:
            critical = None if given["critical"] is None else _number(f"thresholds.{name}.critical", given["critical"])
        if warning is not None and critical is not None and warning > critical:
            raise _fail(f"thresholds.{name}", dict(given), f"warning {warning:g} is above critical {critical:g}")
        levels[name] = Level(warning, critical)
    return Thresholds(**levels)


def default_leak_idle_seconds(conn_max_age: float | None) -> float:
    if conn_max_age is None:
        return 600.0
    return max(300.0, 2 * conn_max_age)


def parse(instance: Mapping[str, Any] | None) -> Settings:
    if not isinstance(instance, Mapping):
        raise ConfigurationError(f"the instance must be a mapping (got {instance!r})")
    postgres = _endpoint("postgres", instance.get("postgres"), 5432, POSTGRES_KEYS, None)
    pgbouncer = _endpoint("pgbouncer", instance.get("pgbouncer"), 6432, PGBOUNCER_KEYS, "pgbouncer")
    if postgres is None and pgbouncer is None:
        raise ConfigurationError("the instance needs a `postgres` section, a `pgbouncer` section, or both")

    if "conn_max_age" in instance and instance["conn_max_age"] is None:
        conn_max_age = None
    else:
        conn_max_age = _number("conn_max_age", instance.get("conn_max_age", DJANGO_DEFAULT_CONN_MAX_AGE))
    leak = instance.get("leak_idle_seconds")
    leak_idle_seconds = (
        default_leak_idle_seconds(conn_max_age) if leak is None else _number("leak_idle_seconds", leak, 0, False)
    )

    group_by = _strings("group_by", instance.get("group_by", list(DEFAULT_GROUP_BY)))
    for index, dimension in enumerate(group_by):
        if dimension not in DIMENSIONS:
            raise _fail(f"group_by[{index}]", dimension, f"unknown dimension; use {', '.join(DIMENSIONS)}")
    if len(set(group_by)) != len(group_by):
        raise _fail("group_by", list(group_by), "names a dimension twice")

    return Settings(
        postgres=postgres,
        pgbouncer=pgbouncer,
        conn_max_age=conn_max_age,
        leak_idle_seconds=leak_idle_seconds,
        applications=_name_filter("applications", instance.get("applications")),
        databases=_name_filter("databases", instance.get("databases")),
        group_by=tuple(group_by),
        max_tag_values=_integer("max_tag_values", instance.get("max_tag_values", 50), 1),
        thresholds=_thresholds(instance.get("thresholds")),
        log_files=_strings("log_files", instance.get("log_files")),
        log_max_bytes_per_run=_integer(
            "log_max_bytes_per_run", instance.get("log_max_bytes_per_run", DEFAULT_LOG_MAX_BYTES), 1024
        ),
        report_leak_queries=_bool("report_leak_queries", instance.get("report_leak_queries", False)),
        emit_otel_metrics=_bool("emit_otel_metrics", instance.get("emit_otel_metrics", True)),
        tags=_strings("tags", instance.get("tags")),
    )
