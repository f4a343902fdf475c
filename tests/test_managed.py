"""Managed authentication against real servers: an RDS IAM token and an Azure token as the password of each login,
over TLS, made again when the last one has expired; and what a wrong configuration says at start."""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import psycopg
import pymysql
import pytest
from azure.core.credentials import AccessToken
from datadog_checks.base import AgentCheck, ConfigurationError

from datadog_checks.django_db import DjangoDbCheck, managed
from django_db_tools.mariadb import MariaDB
from django_db_tools.sandbox import Sandbox

CAN_CONNECT = "django_db.postgres.can_connect"
REGION = "eu-west-1"
IAM_USER = "iam_reader"
T0 = datetime.datetime(2026, 12, 7, 9, 0, 0, tzinfo=datetime.UTC)


def tls_pair(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    folder.mkdir(parents=True, exist_ok=True)
    crt, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    key.chmod(0o600)
    return crt, key


@pytest.fixture(scope="module")
def tls_postgres() -> Iterator[Sandbox]:
    """A PostgreSQL that accepts TLS, as RDS and Azure do."""
    box = Sandbox(pg_settings={"ssl": "on", "ssl_cert_file": "'../server.crt'", "ssl_key_file": "'../server.key'"})
    tls_pair(box.postgres.base)
    box.start(with_pgbouncer=False)
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def aws_clock(monkeypatch) -> dict[str, datetime.datetime]:
    """botocore's signing clock, fixed at T0 and moved by the test; credentials of the environment, no IMDS."""
    import botocore.auth

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    now = {"at": T0}
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now["at"])
    return now


def rds_token(port: int, user: str = IAM_USER) -> str:
    """The token botocore makes at its clock's time: what the check must log in with."""
    client = boto3.session.Session(region_name=REGION).client("rds", region_name=REGION)
    return str(client.generate_db_auth_token(DBHostname="127.0.0.1", Port=port, DBUsername=user, Region=REGION))


def set_password(box: Sandbox, role: str, password: str) -> None:
    with psycopg.connect(box.postgres.dsn(), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(psycopg.sql.Identifier(role), password))


def the_checks_backend(box: Sandbox, role: str) -> tuple[int, bool]:
    """The check's session of ``role``: its pid, and whether it came over TLS."""
    with psycopg.connect(box.postgres.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.pid, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.usename = %s AND a.application_name = 'datadog-django-db'",
            [role],
        ).fetchone()
    assert row is not None, f"no session of {role}"
    return row[0], row[1]


def terminate(box: Sandbox, pid: int) -> None:
    with psycopg.connect(box.postgres.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", [pid])


def logged_by(caplog, run) -> str:
    """What is logged while ``run()`` runs (the tokens the test makes itself are logged by botocore: not these)."""
    caplog.clear()
    run()
    return "\n".join(record.getMessage() for record in caplog.records)


def can_connect(aggregator) -> tuple[int, str]:
    [found] = aggregator.service_checks(CAN_CONNECT)
    return found.status, found.message or ""


@pytest.fixture
def iam_role(tls_postgres: Sandbox) -> Iterator[str]:
    tls_postgres.psql(f"CREATE ROLE {IAM_USER} LOGIN; GRANT pg_monitor TO {IAM_USER};")
    try:
        yield IAM_USER
    finally:
        tls_postgres.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{IAM_USER}'")
        tls_postgres.psql(f"DROP ROLE {IAM_USER}")


def test_an_rds_iam_token_logs_in_and_a_new_one_after_fifteen_minutes(
    aggregator, dd_run_check, tls_postgres, iam_role, aws_clock, caplog
):
    caplog.set_level(logging.DEBUG)
    port = tls_postgres.postgres.port
    first = rds_token(port)
    set_password(tls_postgres, iam_role, first)
    instance = {"postgres": {"host": "127.0.0.1", "port": port, "username": iam_role, "aws": {"region": REGION}}}
    check = DjangoDbCheck("django_db", {}, [instance])
    logged = ""
    try:
        logged += logged_by(caplog, lambda: dd_run_check(check))
        assert can_connect(aggregator)[0] == AgentCheck.OK
        pid, tls = the_checks_backend(tls_postgres, iam_role)
        assert tls, "a token is sent over TLS only (sslmode defaults to require)"

        # Sixteen minutes on: the first token has expired; the server takes only a token made now.
        aws_clock["at"] = T0 + datetime.timedelta(minutes=16)
        second = rds_token(port)
        assert second != first
        set_password(tls_postgres, iam_role, second)
        terminate(tls_postgres, pid)
        aggregator.reset()
        logged += logged_by(caplog, lambda: dd_run_check(check))
        assert can_connect(aggregator)[0] == AgentCheck.OK
        assert the_checks_backend(tls_postgres, iam_role)[0] != pid
    finally:
        check.cancel()
    assert "connecting again" in logged  # the records of the check's runs are those read here
    for token in (first, second):
        assert token not in logged
        assert token.rpartition("X-Amz-Signature=")[2] not in logged


def test_a_refused_token_is_critical_and_never_shown(
    aggregator, dd_run_check, tls_postgres, iam_role, aws_clock, caplog
):
    caplog.set_level(logging.DEBUG)
    set_password(tls_postgres, iam_role, "not-the-token")
    port = tls_postgres.postgres.port
    instance = {"postgres": {"host": "127.0.0.1", "port": port, "username": iam_role, "aws": {"region": REGION}}}
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        logged = logged_by(caplog, lambda: dd_run_check(check))
    finally:
        check.cancel()
    status, message = can_connect(aggregator)
    assert status == AgentCheck.CRITICAL
    assert "password authentication failed" in message
    token = rds_token(port)
    shown = message + logged
    shown += "".join(str(s.message) for name in aggregator._service_checks for s in aggregator.service_checks(name))
    assert token.rpartition("X-Amz-Signature=")[2] not in shown


class Identity:
    """What the managed identity of an Azure host hands out: azure-identity's AccessToken, one after another."""

    def __init__(self, tokens: list[AccessToken]):
        self.tokens = tokens
        self.asked: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.asked.append(scopes)
        return self.tokens[len(self.asked) - 1]


def test_an_azure_token_is_kept_while_valid_and_asked_for_again_near_its_expiry(
    aggregator, dd_run_check, tls_postgres, iam_role, monkeypatch
):
    now = int(time.time())
    lasting, short, fresh = (
        AccessToken("eyJ0eXAiOiJKV1QifQ.eyJvaWQiOiJmaXJzdCJ9.first", now + 3600),
        AccessToken("eyJ0eXAiOiJKV1QifQ.eyJvaWQiOiJzaG9ydCJ9.short", now + 62),
        AccessToken("eyJ0eXAiOiJKV1QifQ.eyJvaWQiOiJmcmVzaCJ9.fresh", now + 3600),
    )
    made: list[tuple[str, float]] = []

    def credential(client_id: str, timeout: float) -> Identity:
        made.append((client_id, timeout))
        return identity

    identity = Identity([lasting, short, fresh])
    monkeypatch.setattr(managed, "azure_credential", credential)
    port = tls_postgres.postgres.port
    azure = {"managed_authentication": {"enabled": True, "client_id": "1b4c3f0e-client"}}
    instance = {"postgres": {"host": "127.0.0.1", "port": port, "username": iam_role, "azure": azure}}
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        set_password(tls_postgres, iam_role, lasting.token)
        dd_run_check(check)
        assert can_connect(aggregator)[0] == AgentCheck.OK
        # A lost connection logs in again with the token still valid: the identity is not asked again.
        terminate(tls_postgres, the_checks_backend(tls_postgres, iam_role)[0])
        aggregator.reset()
        dd_run_check(check)
        assert can_connect(aggregator)[0] == AgentCheck.OK
        assert identity.asked == [(managed.AZURE_SCOPE,)]
        assert made == [("1b4c3f0e-client", 5.0)]
    finally:
        check.cancel()

    # A token with about a minute left is used for the login it came for, not for the next one.
    identity.asked.clear()
    identity.tokens = [short, fresh]
    check = DjangoDbCheck("django_db", {}, [instance])
    try:
        set_password(tls_postgres, iam_role, short.token)
        aggregator.reset()
        dd_run_check(check)
        assert can_connect(aggregator)[0] == AgentCheck.OK
        time.sleep(2.1)  # now less than 60 s to live
        set_password(tls_postgres, iam_role, fresh.token)
        terminate(tls_postgres, the_checks_backend(tls_postgres, iam_role)[0])
        aggregator.reset()
        dd_run_check(check)
        assert can_connect(aggregator)[0] == AgentCheck.OK
        assert len(identity.asked) == 2
    finally:
        check.cancel()


@pytest.fixture(scope="module")
def tls_mariadb() -> Iterator[MariaDB]:
    server = MariaDB()
    crt, key = tls_pair(server.root / "tls")
    key.chmod(0o644)  # read by the server's own user
    server.settings.update({"ssl-cert": crt, "ssl-key": key})
    server.ca = crt  # type: ignore[attr-defined]
    with server:
        yield server


def test_mysql_logs_in_with_a_token_over_tls_only(aggregator, dd_run_check, tls_mariadb, aws_clock):
    token = rds_token(tls_mariadb.port, "iam_mysql")
    # The server refuses this user without TLS, as RDS refuses a token sent in the clear.
    tls_mariadb.sql(
        f"CREATE USER 'iam_mysql'@'%' IDENTIFIED BY '{token}' REQUIRE SSL; GRANT PROCESS ON *.* TO 'iam_mysql'@'%';"
    )
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=tls_mariadb.port, user="iam_mysql", password=token, connect_timeout=5)
    section = {"host": "127.0.0.1", "port": tls_mariadb.port, "username": "iam_mysql", "aws": {"region": REGION}}
    for extra in ({}, {"ssl_ca": str(tls_mariadb.ca)}):  # unverified, then verified against the CA
        aggregator.reset()
        check = DjangoDbCheck("django_db", {}, [{"mysql": {**section, **extra}}])
        try:
            dd_run_check(check)
        finally:
            check.cancel()
        aggregator.assert_service_check("django_db.mysql.can_connect", AgentCheck.OK)
        assert aggregator.metrics("django_db.mysql.max_connections")


@pytest.mark.parametrize(
    "section, key, why",
    [
        ({"aws": {"managed_authentication": {"enabled": True}}}, "`postgres.aws.region`", "is required"),
        (
            {"password": "s3cret", "aws": {"region": REGION, "managed_authentication": {"enabled": True}}},
            "`postgres.password`",
            "exclude each other",
        ),
        (
            {"password": "s3cret", "azure": {"managed_authentication": {"enabled": True}}},
            "`postgres.password`",
            "and `postgres.azure.managed_authentication` exclude each other",
        ),
        (
            {"aws": {"region": REGION}, "azure": {"managed_authentication": {"enabled": True}}},
            "`postgres`",
            "both enabled",
        ),
    ],
)
def test_a_wrong_managed_configuration_is_refused_at_start(section, key, why, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError) as raised:
        DjangoDbCheck("django_db", {}, [{"postgres": {"host": "db.example", **section}}])
    assert str(raised.value).startswith(key), raised.value
    assert why in str(raised.value)
    assert "s3cret" not in str(raised.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_missing_package_is_named_at_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an import finds where boto3 is not installed
    with pytest.raises(ConfigurationError, match=r"^`mysql.aws.managed_authentication`: needs boto3"):
        DjangoDbCheck("django_db", {}, [{"mysql": {"host": "db.example", "aws": {"region": REGION}}}])
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    azure = {"managed_authentication": {"enabled": True}}
    with pytest.raises(ConfigurationError, match=r"^`postgres.azure.managed_authentication`: needs azure-identity"):
        DjangoDbCheck("django_db", {}, [{"postgres": {"host": "db.example", "azure": azure}}])


def test_boto3_and_azure_identity_are_imported_only_where_configured():
    code = (
        "import sys\nfrom datadog_checks.django_db import DjangoDbCheck\n"
        "DjangoDbCheck('django_db', {}, [{'postgres': {'host': 'db.example', 'password': 'pw'}}])\n"
        "print(any(m.split('.')[0] in ('boto3', 'botocore', 'azure') for m in sys.modules))\n"
        "DjangoDbCheck('django_db', {}, [{'postgres': {'host': 'db.example', 'aws': {'region': 'us-east-1'}}}])\n"
        "print('boto3' in sys.modules, 'azure.identity' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["False", "True", "False"]


def test_a_password_beside_a_region_keeps_the_password():
    """As Datadog's own checks have it: a region alone turns IAM on only where no password is given."""
    instance = {"postgres": {"host": "db.example", "password": "pw", "aws": {"region": REGION}}}
    check = DjangoDbCheck("django_db", {}, [instance])
    assert check.settings.postgres is not None and check.settings.postgres.auth is None
    assert "sslmode" not in check.settings.postgres.ssl


def test_pgbouncer_takes_no_managed_token():
    with pytest.raises(ConfigurationError, match=r"^`pgbouncer.aws`: PgBouncer cannot take a managed token"):
        DjangoDbCheck("django_db", {}, [{"pgbouncer": {"host": "db.example", "aws": {"region": REGION}}}])


def test_an_unreachable_sts_is_critical_within_the_timeouts(
    aggregator, dd_run_check, tls_postgres, iam_role, monkeypatch
):
    """A role to assume through an STS that does not answer: CRITICAL within connect_timeout, no exception."""
    from django_db_tools.sandbox import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    aws = {"region": REGION, "managed_authentication": {"enabled": True, "role_arn": "arn:aws:iam::1:role/dd"}}
    section = {"host": "127.0.0.1", "port": tls_postgres.postgres.port, "username": iam_role, "aws": aws}
    check = DjangoDbCheck("django_db", {}, [{"postgres": {**section, "connect_timeout": 2}}])
    try:
        started = time.monotonic()
        dd_run_check(check)
        elapsed = time.monotonic() - started
    finally:
        check.cancel()
    status, message = can_connect(aggregator)
    assert status == AgentCheck.CRITICAL
    assert (
        "login_token_unavailable: the aws login token could not be made: Could not connect to the endpoint" in message
    )
    assert elapsed < 10
