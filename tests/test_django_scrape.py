"""Reading Django processes' endpoints over real sockets: good pages, and endpoints that refuse,
hang, trickle or serve garbage, none of which may hide the servers' view."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from datadog_checks.base import AgentCheck, ConfigurationError
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.config import parse
from datadog_checks.django_db.records import DjangoScrape, DjangoScrapeFailure
from datadog_checks.django_db.sources.django_metrics import DjangoMetricsSource
from django_db_tools.sandbox import free_port

from .conftest import metric_values

CAN_SCRAPE = "django_db.django.can_scrape"
PG = {"host": "127.0.0.1", "port": 5432, "username": "datadog", "password": "x"}


class Silent:
    """A socket that accepts connections and never answers; what it receives is dropped."""

    def __init__(self, trickle: float | None = None, in_headers: bool = False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.trickle = trickle  # seconds between bytes of an endless page, or None for silence
        self.in_headers = in_headers  # trickle an endless header line instead of the body
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.trickle is not None:
                threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: " if self.in_headers else b"HTTP/1.1 200 OK\r\n\r\n")
            while not self.stop.wait(self.trickle):
                conn.sendall(b"#")
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for conn in self.conns:
            conn.close()


class Fixed(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def serve(status: int, body: bytes) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = type("Handler", (Fixed,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/metrics"


@pytest.fixture
def exporter() -> Iterator[tuple[CollectorRegistry, str]]:
    """A prometheus_client exporter with django-prometheus's counters (namespaced) and the pool gauges
    docs/django-metrics.md shows."""
    registry = CollectorRegistry()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield registry, f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def bad_endpoints() -> Iterator[dict[str, str]]:
    silent, trickle, stalled = Silent(), Silent(trickle=0.2), Silent(trickle=0.2, in_headers=True)
    garbage, garbage_url = serve(200, b"<html><body>Welcome to nginx</body></html>")
    missing, missing_url = serve(404, b"not found")
    yield {
        "refused": f"http://127.0.0.1:{free_port()}/metrics",
        "hanging": f"http://127.0.0.1:{silent.port}/metrics",
        "trickling": f"http://127.0.0.1:{trickle.port}/metrics",
        "stalled": f"http://127.0.0.1:{stalled.port}/metrics",
        "garbage": garbage_url,
        "missing": missing_url,
    }
    for server in (garbage, missing):
        server.shutdown()
        server.server_close()
    for sock in (silent, trickle, stalled):
        sock.close()


def test_reads_django_prometheus_counters_with_a_namespace_and_pool_gauges(exporter):
    registry, url = exporter
    labels = ["alias", "vendor"]
    new = Counter("shop_django_db_new_connections_total", "", labels, registry=registry)
    failed = Counter("shop_django_db_new_connection_errors_total", "", labels, registry=registry)
    Counter("shop_django_db_execute_total", "", labels, registry=registry).labels("default", "postgresql").inc(42)
    errors = Counter("shop_django_db_errors_total", "", [*labels, "type"], registry=registry)
    new.labels("default", "postgresql").inc(7)
    new.labels("replica", "postgresql").inc(2)
    failed.labels("default", "postgresql").inc(3)
    errors.labels("default", "postgresql", "OperationalError").inc(4)
    Gauge("django_db_pool_requests_waiting", "", ["alias"], registry=registry).labels("default").set(5)
    Counter("django_db_pool_timeouts", "", ["alias"], registry=registry).labels("default").inc(6)
    source = DjangoMetricsSource(
        parse({"postgres": PG, "django_metrics": [{"url": url, "app": "web"}]}).django_metrics, {}, None
    )
    try:
        [scrape] = source.read()
    finally:
        source.close()
    assert isinstance(scrape, DjangoScrape), scrape
    by_alias = {a.alias: a for a in scrape.aliases}
    assert (by_alias["default"].new_connections, by_alias["default"].connection_errors) == (7, 3)
    assert by_alias["default"].queries == 42 and by_alias["default"].errors == (("OperationalError", 4.0),)
    assert by_alias["replica"].new_connections == 2
    [pool] = scrape.pools
    assert (pool.alias, pool.requests_waiting, pool.timeouts, pool.size) == ("default", 5, 6, None)


def test_each_bad_endpoint_shows_in_its_own_check_and_the_servers_view_stands(
    aggregator, dd_run_check, pg_instance, bad_endpoints
):
    timeout = 1.0
    endpoints = [{"url": url, "app": name, "timeout": timeout} for name, url in bad_endpoints.items()]
    check = DjangoDbCheck("django_db", {}, [{**pg_instance, "django_metrics": endpoints}])
    started = time.monotonic()
    dd_run_check(check)
    elapsed = time.monotonic() - started
    check.cancel()

    aggregator.assert_service_check("django_db.postgres.can_connect", AgentCheck.OK)
    assert metric_values(aggregator, "django_db.postgres.max_connections") == [100]
    health = aggregator.service_checks("django_db.connection_health")
    assert len(health) == 1 and "Django metrics" not in (health[0].message or "")

    expected = {
        "refused": ("connection_refused", "Connection refused"),
        "hanging": ("connect_timeout", "no answer within 1 s"),
        "trickling": ("connect_timeout", "the page took longer than 1 s"),
        "stalled": ("connect_timeout", "no page within 1 s"),
        "garbage": ("bad_exposition", "not Prometheus text"),
        "missing": ("http_status", "HTTP 404"),
    }
    for name, (signature, text) in expected.items():
        tags = [f"app:{name}", f"django_endpoint:{bad_endpoints[name]}", "env_name:test"]
        [sc] = [s for s in aggregator.service_checks(CAN_SCRAPE) if f"app:{name}" in s.tags]
        assert sc.status == AgentCheck.CRITICAL and set(tags) <= set(sc.tags), sc
        assert text in sc.message and f"(app={name})" in sc.message, sc.message
        assert metric_values(aggregator, "django_db.errors", f"signature:{signature}", "source:django", *tags) == [1]
    # Read side by side: the run waits for the slowest read, cut at twice its timeout plus a second.
    assert elapsed < 2 * timeout + 2.5, elapsed


def test_credentials_in_the_url_never_show(aggregator, dd_run_check, pg_instance):
    port = free_port()
    url = f"http://monitor:hunter2@127.0.0.1:{port}/metrics?token=s3cr3t"
    check = DjangoDbCheck("django_db", {}, [{**pg_instance, "django_metrics": [{"url": url, "app": "web"}]}])
    dd_run_check(check)
    check.cancel()
    [sc] = aggregator.service_checks(CAN_SCRAPE)
    shown = " ".join([sc.message, *sc.tags, *(t for m in aggregator.metrics("django_db.errors") for t in m.tags)])
    assert f"django_endpoint:http://127.0.0.1:{port}/metrics" in sc.tags
    assert "hunter2" not in shown and "s3cr3t" not in shown and "monitor" not in shown


def test_a_failed_read_is_a_record_never_an_exception(bad_endpoints):
    endpoints = parse(
        {"postgres": PG, "django_metrics": [{"url": bad_endpoints["hanging"], "app": "web", "timeout": 0.5}]}
    ).django_metrics
    source = DjangoMetricsSource(endpoints, {}, None)
    try:
        [failure] = source.read()
    finally:
        source.close()
    assert isinstance(failure, DjangoScrapeFailure) and failure.problem == "connect_timeout"


@pytest.mark.parametrize(
    "endpoints, key",
    [
        ("http://x/metrics", "django_metrics"),
        ([{"app": "web"}], "django_metrics[0].url"),
        ([{"url": "ftp://x/metrics", "app": "web"}], "django_metrics[0].url"),
        ([{"url": "http://x:99999/metrics", "app": "web"}], "django_metrics[0].url"),
        ([{"url": "http://x/metrics"}], "django_metrics[0].app"),
        ([{"url": "http://x/metrics", "app": "web", "timeout": 0}], "django_metrics[0].timeout"),
        ([{"url": "http://x/metrics", "app": "web", "tls_verify": "no"}], "django_metrics[0].tls_verify"),
        ([{"url": "http://x/metrics", "app": "web", "auth_type": "magic"}], "django_metrics[0].auth_type"),
        ([{"url": "http://x/metrics", "app": "web", "verify": False}], "unknown option 'verify'"),
        ([{"url": "http://x/m", "app": "a"}, {"url": "http://x/m", "app": "b"}], "django_metrics[1].url"),
    ],
)
def test_configuration_errors_name_the_key(endpoints, key):
    with pytest.raises(ConfigurationError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse({"postgres": PG, "django_metrics": endpoints})


def test_secrets_in_options_are_not_echoed():
    bad = {"url": "http://u:pw1@x/m", "app": "web", "headers": "Authorization: Bearer tok3n", "password": 5}
    for key in ("headers", "password"):
        with pytest.raises(ConfigurationError) as raised:
            parse({"postgres": PG, "django_metrics": [{k: v for k, v in bad.items() if k in ("url", "app", key)}]})
        assert "tok3n" not in str(raised.value) and "pw1" not in str(raised.value), raised.value
