"""The check's settings as plain records: what the sources and the evaluation read.

Built from the validated configuration model by ``config.settings_from``; importing this module loads
neither pydantic nor the Agent's base package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .managed import ManagedAuth
from .patterns import NamePattern
from .redact import bare_url

APPLICATION_NAME = "datadog-django-db"  # the check's own sessions' application_name

# A managed service's own sessions: its roles (MySQL: users) and databases, which provider_sessions adds to.
PROVIDER_USERS = (
    "rdsadmin",  # RDS and Aurora
    "azuresu", "azure_superuser",  # Azure
    "cloudsqladmin", "cloudsqlagent", "cloudsqlreplica", "cloudsqllogical", "cloudsqlconnpooladmin",
    "cloudsqlobservability", "cloudsqlimportexport",  # Cloud SQL, by the features turned on
)  # fmt: skip
PROVIDER_DATABASES = ("rdsadmin", "azure_maintenance", "cloudsqladmin", "alloydbadmin", "alloydbmetadata")


@dataclass(frozen=True)
class AppProfile:
    """A per-application profile (the ``apps`` option): the connection math of a runbook."""

    name: str  # the `app` tag of its metrics and its name in messages
    match: NamePattern
    max_connections: int | None  # its budget
    conn_max_age: float | None  # None: persistent connections
    leak_idle_seconds: float
    pooled: bool


def profile_for(apps: tuple[AppProfile, ...], application_name: str) -> AppProfile | None:
    """The first profile whose pattern is found in the application name: the one rule for every use."""
    for profile in apps:
        if profile.match.search(application_name):
            return profile
    return None


@dataclass(frozen=True)
class Endpoint:
    kind: str  # postgres, pgbouncer or mysql
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    dbname: str
    connect_timeout: float
    query_timeout: float
    ssl: Mapping[str, str]
    name: str = ""  # what its server tag says instead of <host>:<port> (several PgBouncers on one address)
    auth: ManagedAuth | None = None  # a token in place of the password (AWS IAM, Azure managed identity)

    # Made once: the values are read on every run (cached_property writes past the frozen fields).
    @cached_property
    def server_tag(self) -> str:
        return self.name or f"{self.host}:{self.port}"

    @cached_property
    def tag(self) -> str:
        """``postgres_server:<host>:<port>``, ``pgbouncer_server:...`` or ``mysql_server:...``."""
        return f"{self.kind}_server:{self.server_tag}"


@dataclass(frozen=True)
class DjangoEndpoint:
    """A Prometheus endpoint of Django processes and the application they connect as."""

    url: str = field(repr=False)  # may hold credentials
    app: str
    timeout: float  # the whole read, connecting included
    http: Mapping[str, Any] = field(repr=False)  # the options of the base's HTTP wrapper

    @property
    def label(self) -> str:
        """The URL without credentials, query string or fragment: safe in tags and messages."""
        return bare_url(self.url)


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
    include: tuple[NamePattern, ...] = ()
    exclude: tuple[NamePattern, ...] = ()

    @property
    def everything(self) -> bool:
        """Whether every name passes (no include, no exclude)."""
        return not (self.include or self.exclude)

    def allows(self, name: str) -> bool:
        if self.everything:
            return True
        if self.include and not any(p.search(name) for p in self.include):
            return False
        return not any(p.search(name) for p in self.exclude)


@dataclass(frozen=True)
class Settings:
    postgres: Endpoint | None
    pgbouncer: Endpoint | None  # the first of ``pgbouncers``; in one PgBouncer's evaluation, that PgBouncer
    mysql: Endpoint | None
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
    extra_metrics: frozenset[str] = frozenset()  # the opt-in metric groups asked for (METRIC_GROUPS)
    apps: tuple[AppProfile, ...] = ()
    django_metrics: tuple[DjangoEndpoint, ...] = ()
    otel_semconv: str = "legacy"  # legacy, current or both (OTEL_SEMCONV)
    pgbouncers: tuple[Endpoint, ...] = ()  # every PgBouncer section
    pooler_networks: tuple[str, ...] = ()  # pooler_addresses, as networks (10.0.0.7/32)
    finding_hold_seconds: float = 300.0  # how long a finding from errors stays after its last line
    provider_users: frozenset[str] = frozenset(PROVIDER_USERS)  # a managed service's own roles or users
    provider_databases: frozenset[str] = frozenset(PROVIDER_DATABASES)  # and its databases

    @property
    def otel_legacy(self) -> bool:
        """Whether to send db.client.connections.usage, the name before the semantic conventions 1.26."""
        return self.emit_otel_metrics and self.otel_semconv != "current"

    @property
    def otel_current(self) -> bool:
        """Whether to send the db.client.connection.* metrics of the semantic conventions 1.26 and later."""
        return self.emit_otel_metrics and self.otel_semconv != "legacy"

    def leak_idle_seconds_for(self, application_name: str) -> float:
        """The leak threshold of an application: its profile's, else the instance's."""
        profile = profile_for(self.apps, application_name)
        return profile.leak_idle_seconds if profile is not None else self.leak_idle_seconds
