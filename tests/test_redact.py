"""Secrets are masked where they appear (connection parameters, URLs), never as a substring of other words."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.redact import MASK, redact
from django_db_tools import cli
from django_db_tools.sandbox import Sandbox


@pytest.mark.parametrize(
    "text, secret",
    [
        ("host=h port=5432 user=u password=hunter2 dbname=d", "hunter2"),
        ("host=h password='two words' dbname=d", "two words"),
        ("host=h password='it\\'s' dbname=d", "it\\'s"),
        ("PGPASSWORD=hunter2 psql", "hunter2"),
        ("{'host': 'h', 'password': 'hunter2'}", "hunter2"),
        ('{"password": "hunter2", "port": 1}', "hunter2"),
        ("password: hunter2", "hunter2"),
        ("postgresql://u:hunter2@h:5432/db", "hunter2"),
        ("see postgres://app:hunter2@10.0.0.1/db?sslmode=require", "hunter2"),
        ("url http://h/x?user=u&password=hunter2&x=1", "hunter2"),
        ("api_key=abc123 token=def456", "abc123"),
    ],
)
def test_secrets_in_parameters_and_urls_are_masked(text, secret):
    masked = redact(text)
    assert secret not in masked and MASK in masked, masked


@pytest.mark.parametrize(
    "text",
    [
        'connection to server at "127.0.0.1", port 5432 failed: Connection refused',
        'FATAL:  password authentication failed for user "datadog"',
        "postgresql://h:5432/db",
        "token bucket on the connection",
    ],
)
def test_ordinary_words_are_kept(text):
    assert redact(text) == text


def test_a_short_password_leaves_the_message_whole(aggregator, dd_run_check, sandbox):
    """With password `on`, the message once read `c********necti********`."""
    instance = {"postgres": {**sandbox.postgres.instance(Sandbox.MONITOR_USER), "password": "on"}}
    check = DjangoDbCheck("django_db", {}, [instance])
    dd_run_check(check)
    [status] = aggregator.service_checks("django_db.postgres.can_connect")
    assert status.status == AgentCheck.CRITICAL
    assert "password authentication failed" in status.message and "connection" in status.message
    assert MASK not in status.message
    check.cancel()


def test_the_runner_prints_ordinary_words_whole(tmp_path, sandbox):
    conf = tmp_path / "conf.yaml"
    instance = {"postgres": {**sandbox.postgres.instance(Sandbox.MONITOR_USER, Sandbox.MONITOR_PASSWORD)}}
    instance["postgres"]["password"] = "on"
    conf.write_text(yaml.safe_dump({"init_config": {}, "instances": [instance]}))
    out = io.StringIO()
    assert cli.main(["check", "-c", str(conf), "--json"], out, io.StringIO()) == 0
    [item] = json.loads(out.getvalue())
    [can_connect] = [c for c in item["aggregator"]["service_checks"] if c["check"] == "django_db.postgres.can_connect"]
    assert "authentication" in can_connect["message"] and "connection" in can_connect["message"]
    assert MASK not in out.getvalue()


class EchoingPeer:
    """A loopback server that answers libpq's startup as a peer or proxy might: with a FATAL error
    that quotes the password it was configured with."""

    def __init__(self, echoed: str):
        import socket
        import threading

        self.echoed = echoed
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import struct

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                while True:
                    head = conn.recv(8, 0x100)  # MSG_WAITALL
                    if len(head) < 8:
                        break
                    length, code = struct.unpack("!ii", head)
                    conn.recv(length - 8, 0x100) if length > 8 else b""
                    if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not spoken here
                        conn.sendall(b"N")
                        continue
                    fields = [
                        b"SFATAL", b"VFATAL", b"C28P01",
                        b'Mpassword "' + self.echoed.encode() + b'" is not valid for user "datadog"',
                    ]  # fmt: skip
                    body = b"".join(f + b"\0" for f in fields) + b"\0"
                    conn.sendall(b"E" + struct.pack("!i", len(body) + 4) + body)
                    break

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("password", ["S3cr3t-P@ss", "on"])
def test_a_password_echoed_by_the_peer_is_masked(aggregator, dd_run_check, caplog, password):
    peer = EchoingPeer(password)
    try:
        instance = {"postgres": {"host": "127.0.0.1", "port": peer.port, "username": "datadog", "password": password}}
        check = DjangoDbCheck("django_db", {}, [instance])
        dd_run_check(check)
        check.cancel()
    finally:
        peer.close()
    (can_connect,) = aggregator.service_checks("django_db.postgres.can_connect")
    text = can_connect.message
    print(f"\n{text}")
    assert can_connect.status == AgentCheck.CRITICAL
    assert f'password "{MASK}" is not valid for user "datadog"' in text
    assert f'"{password}"' not in text and f'"{password}"' not in caplog.text
    assert "connection failed: connection to server" in text  # ordinary words stay whole


def test_a_configured_secret_is_masked_as_a_whole_token_only():
    from datadog_checks.django_db.redact import instance_secrets, secret_patterns

    secrets = secret_patterns(
        instance_secrets({"postgres": {"password": "on"}, "django_metrics": [{"password": "p@ss!"}]})
    )
    assert redact('password "on" is not valid; connection on hold', secrets) == (
        f'password "{MASK}" is not valid; connection {MASK} hold'
    )
    assert redact("user x:p@ss! failed, p@ss!y", secrets) == f"user x:{MASK} failed, {MASK}y"
    assert redact("connection conditions", secrets) == "connection conditions"
