"""Django processes' Prometheus endpoints (django-prometheus): I/O only, returns records.

Each endpoint is read through its own instance of the base's HTTP wrapper, so the Agent's
usual HTTP options (timeout, TLS, headers, auth, proxy) apply, and the text is parsed with
prometheus_client's parser, which the Agent embeds. Endpoints are read side by side: one
that hangs costs its own timeout, never the sum of everyone's. A read never raises: a
failure comes back as a ``DjangoScrapeFailure``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from logging import Logger, LoggerAdapter
from typing import Any

import requests
from datadog_checks.base.utils.http import RequestsWrapper
from prometheus_client.parser import text_string_to_metric_families

from ..records import DjangoAlias, DjangoPool, DjangoScrape, DjangoScrapeFailure
from ..settings import DjangoEndpoint

MAX_BYTES = 8 * 1024 * 1024  # django-prometheus pages weigh tens of kilobytes
MAX_PARALLEL = 8
CHUNK = 64 * 1024
# A page that answers a server error (5xx) is read once more after this long, within the same timeout.
# prometheus_client's multiprocess page answers HTTP 500 while a worker that is starting has created its
# file and not yet sized it (prometheus/client_python#1199): gunicorn starts workers on max_requests, after a
# killed worker and on every deploy, and a read in that instant is no failure of the application's. A file
# left empty for good (its worker killed in that instant) fails the read again: CRITICAL, as it should.
RETRY_AFTER = 0.2

# Sample names, matched with or without the PROMETHEUS_METRIC_NAMESPACE prefix.
ALIAS_COUNTERS = {
    "django_db_new_connections_total": "new_connections",
    "django_db_new_connection_errors_total": "connection_errors",
    "django_db_execute_total": "queries",
}
ERRORS = "django_db_errors_total"
# The gauges and counters of the README's collector over a Django 5.1 pool's get_stats().
POOL_SAMPLES = {
    "django_db_pool_size": "size",
    "django_db_pool_available": "available",
    "django_db_pool_max_size": "max_size",
    "django_db_pool_requests_waiting": "requests_waiting",
    "django_db_pool_timeouts_total": "timeouts",
    "django_db_pool_connections_total": "connections",
    "django_db_pool_min_size": "min_size",
}


class Problem(Exception):
    """A read that failed, with the name it is counted under; ``again``: worth reading once more."""

    def __init__(self, name: str, detail: str, again: bool = False):
        super().__init__(detail)
        self.name = name
        self.again = again


def _named(name: str, wanted: Iterable[str]) -> str | None:
    """The wanted name that ``name`` is, with or without a namespace prefix."""
    for base in wanted:
        if name == base or (name.endswith(base) and name[-len(base) - 1] == "_"):
            return base
    return None


def parse(text: str, url: str, app: str, read_at: float) -> DjangoScrape:
    """The exposition text of one endpoint as a record; raises Problem on text that is not one.

    A page without django-prometheus's database metrics is read as no database use yet: they
    appear with a process's first connection (its database backend registers them).
    """
    counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    errors: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    pools: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                alias = sample.labels.get("alias", "default")
                if (base := _named(sample.name, ALIAS_COUNTERS)) is not None:
                    counters[alias][ALIAS_COUNTERS[base]] += sample.value
                elif _named(sample.name, (ERRORS,)) is not None:
                    errors[alias][sample.labels.get("type", "unknown")] += sample.value
                elif (base := _named(sample.name, POOL_SAMPLES)) is not None:
                    pools[alias][POOL_SAMPLES[base]] += sample.value
    except ValueError as e:
        raise Problem("bad_exposition", f"not Prometheus text: {str(e)[:120]}") from None
    aliases = tuple(
        DjangoAlias(
            alias=alias,
            new_connections=counters[alias].get("new_connections", 0.0),
            connection_errors=counters[alias].get("connection_errors", 0.0),
            queries=counters[alias].get("queries", 0.0),
            errors=tuple(sorted(errors[alias].items())),
        )
        for alias in sorted(set(counters) | set(errors))
    )
    return DjangoScrape(
        url=url,
        app=app,
        time=read_at,
        aliases=aliases,
        pools=tuple(DjangoPool(alias, **values) for alias, values in sorted(pools.items())),
    )


def read_text(http: RequestsWrapper, url: str, timeout: float) -> str:
    """The page's text, read within ``timeout`` from the first byte sent to the last received. A server error
    is read again once, ``RETRY_AFTER`` later, where the timeout leaves the time."""
    deadline = time.monotonic() + timeout
    try:
        return _read(http, url, timeout, deadline)
    except Problem as e:
        if not e.again or time.monotonic() + RETRY_AFTER >= deadline:
            raise
        first = str(e)
    time.sleep(RETRY_AFTER)
    try:
        return _read(http, url, timeout, deadline)
    except Problem as e:
        later = f"{RETRY_AFTER:g} s later"
        raise Problem(e.name, f"{first}, and again {later}" if str(e) == first else f"{first}; {later}: {e}") from None


def _read(http: RequestsWrapper, url: str, timeout: float, deadline: float) -> str:
    try:
        response = http.get(url, stream=True)  # type: ignore[no-untyped-call]  # the base is not typed
    except requests.exceptions.SSLError as e:
        raise Problem("tls_error", f"TLS failed: {type(e).__name__}") from None
    except requests.exceptions.Timeout:
        raise Problem("connect_timeout", f"timed out: no answer within {timeout:g} s") from None
    except requests.exceptions.ConnectionError as e:
        raise Problem("connection_refused", f"connection refused or unreachable ({_reason(e)})") from None
    try:
        if response.status_code >= 400:
            status = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
            raise Problem("http_status", status, again=response.status_code >= 500)
        chunks, size = [], 0
        for chunk in _chunks(response):
            size += len(chunk)
            if size > MAX_BYTES:
                raise Problem("bad_exposition", f"the page is larger than {MAX_BYTES // (1024 * 1024)} MB")
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise Problem("connect_timeout", f"timed out: the page took longer than {timeout:g} s")
    except requests.exceptions.RequestException as e:
        name = "connect_timeout" if "timed out" in str(e).lower() else "connection_refused"
        raise Problem(name, f"the read failed: timed out within {timeout:g} s" if name == "connect_timeout" else
                      f"the read failed ({_reason(e)})") from None  # fmt: skip
    finally:
        response.close()
    return b"".join(chunks).decode("utf-8", errors="replace")


def _chunks(response: Any) -> Iterator[bytes]:
    """The body as it arrives, one receive at a time, so a page sent a byte at a time meets the deadline."""
    raw = response.raw
    if not hasattr(raw, "read1"):  # urllib3 before 2.3
        yield from response.iter_content(chunk_size=1024)
        return
    while chunk := raw.read1(CHUNK, decode_content=True):
        yield chunk


def _reason(error: BaseException) -> str:
    """What went wrong, from the chain of causes; never their text, which names the URL."""
    texts, seen = [], set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        texts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    joined = " ".join(texts)
    if "refused" in joined.lower():
        return "Connection refused"
    if "resolution" in joined or "not known" in joined or "nodename" in joined:
        return "the host name does not resolve"
    return type(error).__name__


class DjangoMetricsSource:
    def __init__(
        self,
        endpoints: tuple[DjangoEndpoint, ...],
        init_config: Mapping[str, Any] | None,
        logger: Logger | LoggerAdapter[Logger],
    ):
        self.endpoints = endpoints
        self.http = [
            RequestsWrapper(dict(e.http), dict(init_config or {}), logger=logger)  # type: ignore[no-untyped-call]
            for e in endpoints
        ]
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(MAX_PARALLEL, len(endpoints))), thread_name_prefix="django-db-metrics"
        )

    def read(self) -> list[DjangoScrape | DjangoScrapeFailure]:
        """Every endpoint, read side by side; in the order of the configuration.

        Each read stops itself at its deadline; a read still going a little after that (headers
        sent a byte at a time) is left behind and reported as timed out, so the run never waits.
        """
        futures = [self._pool.submit(self._read_one, e, h) for e, h in zip(self.endpoints, self.http, strict=True)]
        wait(futures, timeout=max(e.timeout for e in self.endpoints) * 2 + 1)
        return [
            f.result()
            if f.done()
            else DjangoScrapeFailure(e.label, e.app, "connect_timeout", f"timed out: no page within {e.timeout:g} s")
            for e, f in zip(self.endpoints, futures, strict=True)
        ]

    @staticmethod
    def _read_one(endpoint: DjangoEndpoint, http: RequestsWrapper) -> DjangoScrape | DjangoScrapeFailure:
        try:
            text = read_text(http, endpoint.url, endpoint.timeout)
            return parse(text, endpoint.label, endpoint.app, time.monotonic())
        except Problem as e:
            return DjangoScrapeFailure(endpoint.label, endpoint.app, e.name, str(e))
        except Exception as e:  # a read must never take the run down
            return DjangoScrapeFailure(endpoint.label, endpoint.app, "unknown", type(e).__name__)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
