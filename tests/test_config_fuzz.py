"""Malformed instances: construction raises ConfigurationError or succeeds, and a run never raises.

Every endpoint a constructed check may reach is a loopback port bound without listening, so
each run ends in a CRITICAL can_connect (connection refused) at once.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from datadog_checks.base import AgentCheck, ConfigurationError
from datadog_checks.base.stubs import aggregator as stub_aggregator
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from datadog_checks.django_db import DjangoDbCheck

CAN_CONNECT = {"postgres": "django_db.postgres.can_connect", "pgbouncer": "django_db.pgbouncer.can_connect"}


def _closed_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
    return sock, sock.getsockname()[1]


CLOSED_SOCKET, CLOSED_PORT = _closed_port()


@pytest.fixture(scope="module", autouse=True)
def closed_port() -> Iterator[int]:
    yield CLOSED_PORT
    CLOSED_SOCKET.close()


HUGE = (10**400, 10**5000, "9" * 5000, 10**19)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(),
    st.sampled_from(
        [
            1e10,
            3000000,
            -0.0,
            "²",
            "",
            "\x00",
            "1e999",
            "0x10",
            "nan",
            "a{99999999999}",
            "(",
            "^(a+)+$",
            "postgresql://u:pw@h/db",
            [],
            {},
            [None],
            {"x": 1},
            {0: 1, "x": 2},
        ]
    ),
    st.integers(0, 3).map(lambda i: HUGE[i]),  # by index: hypothesis cannot show a number of 5000 digits
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.one_of(st.integers(0, 2), st.text(max_size=3)), st.integers(), max_size=2),
)


def _or_junk(*valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a valid value, one time in six junk: most instances then hold one mistake or two."""
    return st.integers(0, 5).flatmap(lambda i: JUNK if i == 0 else st.one_of(*valid))


SECONDS = st.floats(min_value=0.001, max_value=2)


def _mostly(valid: object, *bad: object) -> st.SearchStrategy:
    return st.integers(0, 5).flatmap(lambda i: st.sampled_from(bad) if i == 0 else st.just(valid))


# Never a name to resolve nor a port that could be open: bad hosts and ports come from these lists.
HOST = _mostly("127.0.0.1", "", None, 5, ["127.0.0.1"], "\x00")
PORT = _mostly(CLOSED_PORT, str(CLOSED_PORT), 0, 70000, -1, True, "²", "5432x", 5432.0, 10**20)
LOCATION = {"host": HOST, "port": PORT}  # always given: the defaults could reach a real server
COMMON = {
    "username": _or_junk(st.text(min_size=1, max_size=8)),
    "password": _or_junk(st.text(max_size=8)),
    "sslmode": _or_junk(st.sampled_from(["disable", "prefer", "sometimes"])),
    "connect_timeout": _or_junk(SECONDS),
    "query_timeout": _or_junk(SECONDS),
}
POSTGRES = st.fixed_dictionaries(
    LOCATION,
    optional={**COMMON, "dbname": _or_junk(st.text(min_size=1, max_size=8))},
)
PGBOUNCER = st.fixed_dictionaries(LOCATION, optional=COMMON)
PATTERNS = st.lists(
    _or_junk(st.sampled_from(["^web", "admin$", "", "(", "a{99999999999}", "^(a+)+$", "(a|a)*b"]), st.text(max_size=6)),
    max_size=3,
)
NAME_FILTER = _or_junk(st.fixed_dictionaries({}, optional={"include": PATTERNS, "exclude": PATTERNS}))
LEVEL = _or_junk(st.floats(min_value=0, max_value=1000))
THRESHOLDS = _or_junk(
    st.fixed_dictionaries(
        {},
        optional={
            name: _or_junk(st.fixed_dictionaries({}, optional={"warning": LEVEL, "critical": LEVEL}))
            for name in ("utilization", "leaked_connections", "churn_per_minute")
        },
    )
)
DJANGO_URL = _mostly(
    f"http://127.0.0.1:{CLOSED_PORT}/metrics", f"https://u:pw@127.0.0.1:{CLOSED_PORT}/m?t=1", "ftp://x/m",
    "http://[::1/m", f"http://127.0.0.1:{CLOSED_PORT}:1/m", "127.0.0.1:9/metrics", None, 5,
)  # fmt: skip
DJANGO_METRICS = _or_junk(
    st.lists(
        _or_junk(
            st.fixed_dictionaries(
                {"url": DJANGO_URL, "app": _or_junk(st.text(min_size=1, max_size=5))},
                optional={
                    "timeout": _or_junk(SECONDS),
                    "tls_verify": _or_junk(st.booleans()),
                    "auth_type": _or_junk(st.sampled_from(["basic", "digest", "magic"])),
                    "headers": _or_junk(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
                    "password": _or_junk(st.text(max_size=8)),
                },
            )
        ),
        max_size=2,
    )
)
INSTANCE = st.fixed_dictionaries(
    {"postgres": _or_junk(POSTGRES)},
    optional={
        "pgbouncer": _or_junk(PGBOUNCER),
        "conn_max_age": _or_junk(st.floats(min_value=0, max_value=1e6)),
        "leak_idle_seconds": _or_junk(st.floats(min_value=1, max_value=1e6)),
        "applications": NAME_FILTER,
        "databases": NAME_FILTER,
        "group_by": _or_junk(st.lists(st.sampled_from(["db", "user", "app", "client_addr"]), max_size=4, unique=True)),
        "max_tag_values": _or_junk(st.integers(min_value=1, max_value=100)),
        "thresholds": THRESHOLDS,
        "log_files": _or_junk(st.lists(st.sampled_from(["/nonexistent/django_db.log", "/dev/null"]), max_size=2)),
        "log_max_bytes_per_run": _or_junk(st.integers(min_value=1024, max_value=10**6)),
        "report_leak_queries": _or_junk(st.booleans()),
        "emit_otel_metrics": _or_junk(st.booleans()),
        "otel_semconv": _or_junk(st.sampled_from(["legacy", "current", "both"])),
        "tags": _or_junk(st.lists(st.text(min_size=1, max_size=8), max_size=2)),
        "min_collection_interval": _or_junk(st.floats(min_value=1, max_value=60)),
        "service": _or_junk(st.text(min_size=1, max_size=5)),
        "debug_metrics": _or_junk(st.just({})),
        "django_metrics": DJANGO_METRICS,
    },
)


@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_or_junk(INSTANCE))
def test_a_malformed_instance_is_refused_at_start_or_runs_to_critical(instance):
    try:
        check = DjangoDbCheck("django_db", {}, [instance])
    except ConfigurationError as e:
        assert "pw@" not in str(e)
        event("refused")
        return
    event("constructed and run")
    stub_aggregator.reset()
    try:
        error = check.run()  # the Agent's entry point: the error report, empty when the run raised nothing
    finally:
        check.cancel()
    assert error == "", error
    for kind, name in CAN_CONNECT.items():
        if instance.get(kind) is not None:
            assert [sc.status for sc in stub_aggregator.service_checks(name)] == [AgentCheck.CRITICAL]
    scraped = stub_aggregator.service_checks("django_db.django.can_scrape")
    assert [sc.status for sc in scraped] == [AgentCheck.CRITICAL] * len(instance.get("django_metrics") or ())
    assert not any("u:pw@" in sc.message or "?t=1" in " ".join(sc.tags) for sc in scraped)
