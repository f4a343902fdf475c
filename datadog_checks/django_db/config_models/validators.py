"""The check's own rules on the instance, run by the generated models (instance.py).

``initialize_instance`` runs first, on the raw instance: every option of the check's sections
is known, and every value has the type and the range the check can use. The names and types
come from the models, which are generated from assets/configuration/spec.yaml.
``check_instance`` then applies the rules across options.

Each mistake raises ``ConfigurationError`` naming the key; pydantic passes it through as it
is. A value is echoed only when it cannot hold a secret.
"""

from __future__ import annotations

import ipaddress
import math
import re
import types
from collections.abc import Mapping
from typing import Any, NoReturn, Union, get_args, get_origin
from urllib.parse import urlsplit

from datadog_checks.base import ConfigurationError
from pydantic import BaseModel

from ..patterns import PatternRefused, compile_name_pattern
from ..redact import MASK, bare_url, looks_like_connection_string, redact

DIMENSIONS = ("db", "user", "app", "client_addr")
DEFAULT_GROUP_BY = ("db", "user", "app")
SSLMODES = ("allow", "disable", "prefer", "require", "verify-ca", "verify-full")
ENDPOINTS = ("postgres", "pgbouncer", "mysql")
NAME_FILTERS = ("applications", "databases")
# Metric groups sent only when `extra_metrics` names them (see the spec for what each holds).
METRIC_GROUPS = (
    "connections_usage",
    "pgbouncer_cancel",
    "pgbouncer_server_states",
    "pgbouncer_databases",
    "pgbouncer_stats",
    "pgbouncer_lists",
)
# The names of OpenTelemetry's database client metrics: the old ones, the semantic conventions' current ones, or both.
OTEL_SEMCONV = ("legacy", "current", "both")

# Defaults of the options inside the endpoint sections; the generated defaults.py holds the
# top-level ones. The PgBouncer console database is always `pgbouncer`; the MySQL connection
# names no database.
ENDPOINT_DEFAULTS: dict[str, dict[str, Any]] = {
    "postgres": {"host": "localhost", "port": 5432, "username": "datadog", "dbname": "postgres"},
    "pgbouncer": {"host": "localhost", "port": 6432, "username": "datadog", "dbname": "pgbouncer"},
    "mysql": {"host": "localhost", "port": 3306, "username": "datadog", "dbname": ""},
}
DEFAULT_TIMEOUT = 5.0

# name: (warning, critical), as in the spec's example
DEFAULT_THRESHOLDS: dict[str, tuple[float | None, float | None]] = {
    "utilization": (0.8, 0.9),
    "pgbouncer_client_utilization": (0.8, 0.9),
    "idle_in_transaction_seconds": (30, 300),
    "idle_in_transaction_count": (None, 50),
    "leaked_connections": (1, 5),
    "pgbouncer_maxwait_seconds": (1, 5),
    "churn_per_minute": (100, None),
}

# A timeout longer than an hour only hides a hung server; the bound also keeps every deadline
# and PostgreSQL's statement_timeout (milliseconds, a 32-bit integer) in range.
MAX_TIMEOUT = 3600
MAX_SECONDS = 10**9  # about 30 years: longer ages mean "never"
LARGEST = 10**15  # any other number
MAX_STRING = 4096

# key, with `*` for either endpoint: (minimum, maximum, minimum allowed)
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "*.port": (1, 65535, True),
    "*.connect_timeout": (0, MAX_TIMEOUT, False),
    "*.query_timeout": (0.001, MAX_TIMEOUT, True),
    "conn_max_age": (0, MAX_SECONDS, True),
    "leak_idle_seconds": (0, MAX_SECONDS, False),
    "max_tag_values": (1, 100_000, True),
    "log_max_bytes_per_run": (1024, 2**30, True),
    "finding_hold_seconds": (0, MAX_SECONDS, True),
    "min_collection_interval": (0, MAX_SECONDS, False),
    "*.max_connections": (1, 10**6, True),  # an `apps` profile's budget
    "*.conn_max_age": (0, MAX_SECONDS, True),  # an `apps` profile's CONN_MAX_AGE
    "*.timeout": (0, MAX_TIMEOUT, False),
    "*.read_timeout": (0, MAX_TIMEOUT, False),
}
# The HTTP wrapper's authentication types (datadog_checks.base.utils.http.AUTH_TYPES).
AUTH_TYPES = ("basic", "digest", "ntlm", "kerberos", "aws")

_INTEGER = re.compile(r"[+-]?[0-9]{1,18}", re.ASCII)
_NUMBER = re.compile(r"[+-]?(?:[0-9]{1,18}(?:\.[0-9]{0,18})?|\.[0-9]{1,18})(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)
_SECRET_KEYS = ("password", "tls_private_key_password")
_SECRET_MAPPINGS = ("headers", "extra_headers", "proxy")  # every value may be a secret


class _Checker:
    """Walks the raw instance along the models' fields; returns the values the models accept."""

    def __init__(self, instance: Mapping[Any, Any]):
        self.secrets = [s for s in _secrets_in(instance) if s]

    def fail(self, key: str, why: str, value: Any = None, echo: bool = True) -> NoReturn:
        got = f" (got {self.show(value)})" if echo else ""
        raise ConfigurationError(f"`{key}`: {why}{got}")

    def show(self, value: Any) -> str:
        """A value as the message shows it: short, and never a secret."""
        if isinstance(value, str):
            if any(secret in value for secret in self.secrets):
                return MASK
            text = redact(value)
            return repr(text if len(text) <= 60 else text[:60] + "…")
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return repr(value)
        if isinstance(value, int):
            if value.bit_length() > 64:
                return f"a number of {len(str(value)) if value.bit_length() < 4000 else 'over 1000'} digits"
            return repr(value)
        if isinstance(value, Mapping):
            return "a mapping"
        if isinstance(value, (list, tuple)):
            return f"a list of {len(value)}"
        return f"a value of type {type(value).__name__}"

    # -- sections ---------------------------------------------------------------------------
    def section(self, key: str, value: Any, model: type[BaseModel], strict: bool = True) -> dict[Any, Any]:
        """A mapping of the model's options; with ``strict``, an unknown option is refused."""
        if not isinstance(value, Mapping):
            if isinstance(value, str) and key in ENDPOINTS and looks_like_connection_string(value):
                self.fail(
                    key,
                    "must be a mapping of options (host, port, username, password ...), not a connection string",
                    echo=False,
                )
            self.fail(key, "must be a mapping of options", value)
        fields = model.model_fields
        result: dict[Any, Any] = {}
        for name, item in value.items():
            path = f"{key}.{name}" if key else str(name)
            if not isinstance(name, str):
                self.fail(key or "instance", "option names must be strings", name)
            if name not in fields:
                if key.startswith("pgbouncer") and name in ("aws", "azure"):
                    self.fail(
                        f"{path}",
                        "PgBouncer cannot take a managed token: its console user logs in with a password "
                        "(auth_file or auth_query)",
                        echo=False,
                    )
                if strict:
                    known = ", ".join(sorted(n for n in fields if n != "dbname" or key != "pgbouncer"))
                    raise ConfigurationError(f"`{key}`: unknown option {self.show(name)}; known: {known}")
                result[name] = item
                continue
            result[name] = self.value(path, item, fields[name].annotation)
        return result

    def value(self, key: str, value: Any, annotation: Any) -> Any:
        kind = _unwrap(annotation)
        if value is None:
            return None
        if get_origin(kind) in (Union, types.UnionType):  # one section, or a list of them (pgbouncer)
            section, sections = (a for a in get_args(kind) if a is not type(None))
            if isinstance(value, (list, tuple)):
                if not value:
                    self.fail(key, "must be a mapping of options, or a list of at least one", value)
                return self.value(key, value, sections)
            return self.value(key, value, section)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            return self.section(key, value, kind)
        if kind is bool:
            if not isinstance(value, bool):
                self.fail(key, "must be true or false", value)
            return value
        if kind is int:
            return self.bounded(key, self.integer(key, value), value)
        if kind is float:
            return self.bounded(key, self.number(key, value), value)
        if kind is str:
            return self.string(key, value)
        if get_origin(kind) is tuple:
            item = get_args(kind)[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                if not isinstance(value, (list, tuple)):
                    self.fail(key, "must be a list of mappings", value)
                return tuple(self.section(f"{key}[{index}]", entry, item) for index, entry in enumerate(value))
            return self.strings(key, value)
        if get_origin(kind) is types.MappingProxyType:
            if not isinstance(value, Mapping):
                self.fail(key, "must be a mapping", echo=False)  # headers and proxies may hold secrets
            return value
        return value

    # -- values -----------------------------------------------------------------------------
    def integer(self, key: str, value: Any) -> int:
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, "must be a whole number", value)
        return value

    def number(self, key: str, value: Any) -> float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value.strip())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, "must be a number", value)
        if isinstance(value, int) and abs(value) > LARGEST:
            self.fail(key, "must be a finite number", value)
        number = float(value)
        if not math.isfinite(number):
            self.fail(key, "must be a finite number", value)
        return number

    def bounded(self, key: str, number: float, given: Any) -> Any:
        bounds = BOUNDS.get(key) or BOUNDS.get("*." + key.rpartition(".")[2] if "." in key else "")
        low, high, low_allowed = bounds or (0, LARGEST, True)
        if number < low or number > high or (number == low and not low_allowed):
            if low_allowed:
                why = f"must be from {_plain(low)} to {_plain(high)}"
            else:
                why = f"must be greater than {_plain(low)} and at most {_plain(high)}"
            self.fail(key, why, given)
        return number

    def string(self, key: str, value: Any) -> str:
        secret = key.rpartition(".")[2] in _SECRET_KEYS
        if not isinstance(value, str):
            if secret:
                self.fail(key, "must be a string: quote it in the YAML file", echo=False)
            self.fail(key, "must be a string", value)
        if "\x00" in value or len(value) > MAX_STRING:
            self.fail(key, f"must be a string of at most {MAX_STRING} characters, without NUL", echo=not secret)
        if not value and not secret:
            self.fail(key, "must be a non-empty string", value)
        return value

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)):
            self.fail(key, "must be a list of strings", value)
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{key}[{index}]", "must be a string", item)
            if "\x00" in item or len(item) > MAX_STRING:
                self.fail(f"{key}[{index}]", f"must be a string of at most {MAX_STRING} characters, without NUL")
        return tuple(value)


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _secrets_in(value: Any, depth: int = 0) -> list[str]:
    if depth > 20:
        return []
    found: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and key.lower() in _SECRET_MAPPINGS and isinstance(item, Mapping):
                found += [str(v) for v in item.values() if isinstance(v, str)]
            elif isinstance(key, str) and key.lower() in _SECRET_KEYS and isinstance(item, (str, int)):
                found.append(str(item) if not isinstance(item, int) or item.bit_length() < 64 else "")
            else:
                found += _secrets_in(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found += _secrets_in(item, depth + 1)
    return found


def _check_rules(checker: _Checker, values: dict[str, Any]) -> None:
    """The rules the models' types cannot say."""
    if all(values.get(name) is None for name in ENDPOINTS):
        raise ConfigurationError("the instance needs a `postgres` section, a `pgbouncer` section or a `mysql` section")
    for key, section in _endpoint_sections(values):
        sslmode = section.get("sslmode")
        if sslmode is not None and sslmode not in SSLMODES:
            checker.fail(f"{key}.sslmode", f"must be one of {', '.join(SSLMODES)}", sslmode)
        if not key.startswith("pgbouncer"):
            _check_managed(checker, key, section)
    _check_pgbouncers(checker, values.get("pgbouncer"))
    for index, address in enumerate(values.get("pooler_addresses") or ()):
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            checker.fail(f"pooler_addresses[{index}]", "is not an IP address or a CIDR network", address)
    group_by = values.get("group_by")
    if group_by is not None:
        for index, dimension in enumerate(group_by):
            if dimension not in DIMENSIONS:
                checker.fail(f"group_by[{index}]", f"unknown dimension; use {', '.join(DIMENSIONS)}", dimension)
        if len(set(group_by)) != len(group_by):
            checker.fail("group_by", "names a dimension twice", ", ".join(group_by))
    semconv = values.get("otel_semconv")
    if semconv is not None and semconv not in OTEL_SEMCONV:
        checker.fail("otel_semconv", f"must be one of {', '.join(OTEL_SEMCONV)}", semconv)
    for index, group in enumerate(values.get("extra_metrics") or ()):
        if group not in METRIC_GROUPS:
            checker.fail(f"extra_metrics[{index}]", f"unknown metric group; use {', '.join(METRIC_GROUPS)}", group)
    for name in NAME_FILTERS:
        for part in ("include", "exclude"):
            for index, pattern in enumerate((values.get(name) or {}).get(part) or ()):
                try:
                    compile_name_pattern(pattern)
                except PatternRefused as e:
                    checker.fail(f"{name}.{part}[{index}]", str(e), pattern)
    for part in ("include", "exclude"):
        for index, pattern in enumerate((values.get("metric_patterns") or {}).get(part) or ()):
            try:
                re.compile(pattern)
            except (re.error, OverflowError, RecursionError, ValueError) as e:
                checker.fail(f"metric_patterns.{part}[{index}]", f"is not a regular expression: {e}", pattern)
    _check_apps(checker, values.get("apps") or ())
    _check_django_metrics(checker, values.get("django_metrics"))
    given = values.get("thresholds") or {}
    for name, (warning, critical) in DEFAULT_THRESHOLDS.items():
        levels = given.get(name) or {}
        warning = levels.get("warning", warning)
        critical = levels.get("critical", critical)
        if warning is not None and critical is not None and warning > critical:
            checker.fail(f"thresholds.{name}", f"warning {warning:g} is above critical {critical:g}", echo=False)


def _get(section: Any, name: str) -> Any:
    """An option of a raw section (a mapping) or of its model."""
    return section.get(name) if isinstance(section, Mapping) else getattr(section, name, None)


def managed_kinds(section: Any) -> tuple[str, ...]:
    """The managed authentications a postgres or mysql section enables: aws, azure, both or none. AWS's is on
    where asked for, or where ``aws.region`` is set and no password is (as Datadog's own checks have it)."""
    aws, azure = _get(section, "aws"), _get(section, "azure")
    aws_on = _get(_get(aws, "managed_authentication") or {}, "enabled") if aws is not None else False
    if aws_on is None:
        aws_on = _get(aws, "region") is not None and not _get(section, "password")
    azure_on = _get(_get(azure, "managed_authentication") or {}, "enabled") if azure is not None else False
    return tuple(kind for kind, on in (("aws", aws_on), ("azure", azure_on)) if on)


# What each kind of managed authentication imports, and the package that brings it.
MANAGED_IMPORTS = {"aws": ("boto3", "boto3"), "azure": ("azure.identity", "azure-identity")}


def _check_managed(checker: _Checker, key: str, section: dict[str, Any]) -> None:
    """Managed authentication: one kind, no password beside it, a region for AWS, its package importable."""
    kinds = managed_kinds(section)
    if len(kinds) > 1:
        checker.fail(key, "`aws` and `azure` managed authentication are both enabled; enable one", echo=False)
    if not kinds:
        return
    [kind] = kinds
    if section.get("password"):
        checker.fail(
            f"{key}.password",
            f"and `{key}.{kind}.managed_authentication` exclude each other: a token is the password of each "
            f"login; remove the password, or set `{key}.{kind}.managed_authentication.enabled: false`",
            echo=False,
        )
    if kind == "aws" and not (section.get("aws") or {}).get("region"):
        checker.fail(f"{key}.aws.region", "is required for IAM authentication: the database's region (us-east-1)")
    module, package = MANAGED_IMPORTS[kind]
    try:
        __import__(module)
    except ImportError as e:
        checker.fail(
            f"{key}.{kind}.managed_authentication",
            f"needs {package}, which the Agent embeds; it cannot be imported here ({e})",
            echo=False,
        )


def _endpoint_sections(values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each server section with its key: ``pgbouncer[1]`` where PgBouncer's are a list."""
    found = []
    for name in ENDPOINTS:
        given = values.get(name)
        if isinstance(given, (list, tuple)):
            found += [(f"{name}[{index}]", section) for index, section in enumerate(given)]
        elif given is not None:
            found.append((name, given))
    return found


def _check_pgbouncers(checker: _Checker, given: Any) -> None:
    """Several PgBouncers are told apart: no two report under the same ``pgbouncer_server`` tag."""
    if not isinstance(given, (list, tuple)):
        return
    defaults = ENDPOINT_DEFAULTS["pgbouncer"]
    seen: set[str] = set()
    for index, section in enumerate(given):
        host, port = section.get("host") or defaults["host"], section.get("port") or defaults["port"]
        tag = section.get("name") or f"{host}:{port}"
        if tag in seen:
            checker.fail(
                f"pgbouncer[{index}]",
                "reports under the same pgbouncer_server tag as another PgBouncer: give each its own `name` "
                "(or reach each over its own host, port or unix_socket_dir)",
                tag,
            )
        seen.add(tag)


def _check_apps(checker: _Checker, apps: Any) -> None:
    """Each profile of `apps` has a pattern that compiles, and its own name."""
    names: set[str] = set()
    for index, app in enumerate(apps):
        pattern = app.get("match")
        if pattern is None:
            checker.fail(f"apps[{index}].match", "is required: a regular expression on application_name", echo=False)
        try:
            compile_name_pattern(pattern)
        except PatternRefused as e:
            checker.fail(f"apps[{index}].match", str(e), pattern)
        name = app.get("name") or profile_label(pattern)
        if name in names:
            checker.fail(f"apps[{index}].name", "names another profile too; give each profile its own `name`", name)
        names.add(name)


def profile_label(pattern: str) -> str:
    """A profile's name when none is given: its pattern without the anchors, `^web$` is `web`."""
    return pattern.removeprefix("^").removesuffix("$") or pattern


def _check_django_metrics(checker: _Checker, endpoints: Any) -> None:
    """Each endpoint has an http(s) URL and an application; no URL is listed twice."""
    seen: list[str] = []
    for index, endpoint in enumerate(endpoints or ()):
        key = f"django_metrics[{index}]"
        url, app = endpoint.get("url"), endpoint.get("app")
        shown = url.partition("?")[0].partition("#")[0] if isinstance(url, str) else url  # show() masks a password
        if url is None:
            checker.fail(f"{key}.url", "is required: the endpoint's URL, e.g. http://10.0.0.7:8001/metrics", echo=False)
        if app is None:
            checker.fail(f"{key}.app", "is required: the application_name those processes connect as", echo=False)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError on a port out of range
        except ValueError as e:
            checker.fail(f"{key}.url", f"is not a URL: {e}", shown)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            checker.fail(f"{key}.url", "must be an http:// or https:// URL", shown)
        if bare_url(url) in seen:
            checker.fail(f"{key}.url", "is listed twice", bare_url(url))
        seen.append(bare_url(url))
        auth_type = endpoint.get("auth_type")
        if auth_type is not None and auth_type.lower() not in AUTH_TYPES:
            checker.fail(f"{key}.auth_type", f"must be one of {', '.join(AUTH_TYPES)}", auth_type)


def initialize_instance(values: Any, **kwargs: Any) -> Any:
    """Check the raw instance; return it with numbers given as text read as numbers."""
    from .instance import InstanceConfig

    if not isinstance(values, Mapping):
        if isinstance(values, str):
            what = "a connection string" if looks_like_connection_string(values) else "a string"
        elif isinstance(values, (bool, float)) or values is None:
            what = repr(values)
        else:
            what = _Checker({}).show(values)
        raise ConfigurationError(f"the instance must be a mapping of options (got {what})")
    checker = _Checker(values)
    checked = checker.section("", values, InstanceConfig, strict=False)
    if not isinstance(values.get("debug_metrics", {}), Mapping):  # read by the base class
        checker.fail("debug_metrics", "must be a mapping of options", values["debug_metrics"])
    _check_rules(checker, checked)
    return checked


def check_instance(model: Any) -> Any:
    return model
