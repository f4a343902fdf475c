"""The check's settings, built from the validated configuration model.

The generated models (config_models/, from assets/configuration/spec.yaml) and the check's
rules in config_models/validators.py are the one validation path: every mistake raises
``ConfigurationError`` naming the key, when the check is constructed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from datadog_checks.base import ConfigurationError

from .config_models import defaults
from .config_models.instance import InstanceConfig
from .config_models.validators import (
    DEFAULT_GROUP_BY,
    DEFAULT_THRESHOLDS,
    DEFAULT_TIMEOUT,
    DIMENSIONS,
    ENDPOINT_DEFAULTS,
    METRIC_GROUPS,
    OTEL_SEMCONV,
    managed_kinds,
)
from .managed import AZURE_SCOPE, ManagedAuth
from .patterns import compile_name_pattern
from .profiles import profiles_from
from .settings import (
    PROVIDER_DATABASES,
    PROVIDER_USERS,
    DjangoEndpoint,
    Endpoint,
    Level,
    NameFilter,
    Settings,
    Thresholds,
)

__all__ = [
    "DIMENSIONS",
    "METRIC_GROUPS",
    "OTEL_SEMCONV",
    "DjangoEndpoint",
    "Endpoint",
    "Level",
    "NameFilter",
    "Settings",
    "Thresholds",
    "parse",
    "settings_from",
]

SSL_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")


def default_leak_idle_seconds(conn_max_age: float | None) -> float:
    if conn_max_age is None:
        return 600.0
    return max(300.0, 2 * conn_max_age)


def parse(instance: Any) -> Settings:
    """Settings of a raw instance, validated as the check validates it."""
    fields = frozenset(instance) if isinstance(instance, Mapping) else frozenset()
    try:
        # A malformed instance (a list, a number) is refused by the validators, which say why.
        model = InstanceConfig.model_validate(instance, context={"configured_fields": fields})
    except ValueError as e:  # pydantic's ValidationError; the validators raise ConfigurationError themselves
        raise ConfigurationError(str(e)) from None
    return settings_from(model)


def _endpoint(kind: str, section: Any) -> Endpoint | None:
    if section is None:
        return None
    defaults_ = ENDPOINT_DEFAULTS[kind]

    def get(name: str, default: Any) -> Any:
        value = getattr(section, name, None)
        return default if value is None else value

    auth = _managed(section) if kind != "pgbouncer" else None
    ssl = {name: getattr(section, name) for name in SSL_KEYS if getattr(section, name, None) is not None}
    if auth is not None and kind == "postgres":
        ssl.setdefault("sslmode", "require")  # a token is a password: never sent in the clear by default
    if kind == "mysql" and section.ssl_ca is not None:
        ssl["ssl_ca"] = section.ssl_ca
    return Endpoint(
        kind=kind,
        host=get("host", defaults_["host"]),
        port=int(get("port", defaults_["port"])),
        username=get("username", defaults_["username"]),
        password=get("password", ""),
        dbname=get("dbname", defaults_["dbname"]),
        connect_timeout=float(get("connect_timeout", DEFAULT_TIMEOUT)),
        query_timeout=float(get("query_timeout", DEFAULT_TIMEOUT)),
        ssl=ssl,
        name=get("name", ""),
        auth=auth,
    )


def _managed(section: Any) -> ManagedAuth | None:
    """The section's managed authentication, where it logs in with tokens."""
    kind = next(iter(managed_kinds(section)), None)  # one at most: the validators refuse both
    if kind == "aws":
        role_arn = section.aws.managed_authentication.role_arn if section.aws.managed_authentication else None
        return ManagedAuth("aws", region=section.aws.region, role_arn=role_arn or "")
    if kind == "azure":
        managed = section.azure.managed_authentication
        return ManagedAuth("azure", client_id=managed.client_id or "", scope=managed.identity_scope or AZURE_SCOPE)
    return None


def _pgbouncers(given: Any) -> tuple[Endpoint, ...]:
    """The PgBouncer sections: one, or a list of them."""
    sections = given if isinstance(given, tuple) else (given,) if given is not None else ()
    return tuple(e for e in (_endpoint("pgbouncer", section) for section in sections) if e is not None)


def _name_filter(section: Any) -> NameFilter:
    if section is None:
        return NameFilter()
    return NameFilter(
        tuple(compile_name_pattern(p) for p in section.include or ()),
        tuple(compile_name_pattern(p) for p in section.exclude or ()),
    )


def _thresholds(section: Any) -> Thresholds:
    levels = {}
    for name, (warning, critical) in DEFAULT_THRESHOLDS.items():
        given = getattr(section, name, None) if section is not None else None
        if given is not None:
            fields = given.model_fields_set
            warning = given.warning if "warning" in fields else warning
            critical = given.critical if "critical" in fields else critical
        levels[name] = Level(warning, critical)
    return Thresholds(**levels)


def _django_endpoint(section: Any) -> DjangoEndpoint:
    options: dict[str, Any] = {
        name: dict(value) if isinstance(value, Mapping) else value
        for name, value in section.model_dump().items()
        if value is not None and name not in ("url", "app")
    }
    timeout = float(options.setdefault("timeout", DEFAULT_TIMEOUT))
    return DjangoEndpoint(url=section.url, app=section.app, timeout=timeout, http=options)


def _given(value: Any, default: Callable[[], Any]) -> Any:
    """The value, or the spec's default where it is null."""
    return default() if value is None else value


def settings_from(model: InstanceConfig) -> Settings:
    """The settings of a validated instance, defaults filled in."""
    postgres = _endpoint("postgres", model.postgres)
    pgbouncers = _pgbouncers(model.pgbouncer)
    mysql = _endpoint("mysql", model.mysql)
    conn_max_age = model.conn_max_age  # null: persistent connections; left out: the generated default
    providers = model.provider_sessions
    leak_idle_seconds = model.leak_idle_seconds
    if leak_idle_seconds is None:
        leak_idle_seconds = default_leak_idle_seconds(conn_max_age)
    return Settings(
        postgres=postgres,
        pgbouncer=pgbouncers[0] if pgbouncers else None,
        pgbouncers=pgbouncers,
        pooler_networks=tuple(
            str(ipaddress.ip_network(address, strict=False)) for address in model.pooler_addresses or ()
        ),
        mysql=mysql,
        conn_max_age=conn_max_age,
        leak_idle_seconds=leak_idle_seconds,
        applications=_name_filter(model.applications),
        databases=_name_filter(model.databases),
        group_by=tuple(model.group_by) if model.group_by is not None else DEFAULT_GROUP_BY,
        max_tag_values=_given(model.max_tag_values, defaults.instance_max_tag_values),
        thresholds=_thresholds(model.thresholds),
        log_files=tuple(model.log_files or ()),
        log_max_bytes_per_run=_given(model.log_max_bytes_per_run, defaults.instance_log_max_bytes_per_run),
        finding_hold_seconds=float(_given(model.finding_hold_seconds, defaults.instance_finding_hold_seconds)),
        report_leak_queries=bool(model.report_leak_queries),
        emit_otel_metrics=_given(model.emit_otel_metrics, defaults.instance_emit_otel_metrics),
        tags=tuple(model.tags or ()),
        extra_metrics=frozenset(model.extra_metrics or ()),
        apps=profiles_from(model.apps, conn_max_age, leak_idle_seconds, default_leak_idle_seconds),
        django_metrics=tuple(_django_endpoint(e) for e in model.django_metrics or ()),
        otel_semconv=_given(model.otel_semconv, defaults.instance_otel_semconv),
        provider_users=frozenset(PROVIDER_USERS).union(providers.users or () if providers else ()),
        provider_databases=frozenset(PROVIDER_DATABASES).union(providers.databases or () if providers else ()),
    )
