"""Managed authentication: a token in place of the password of each new connection.

AWS (RDS, Aurora): an IAM token is a SigV4-presigned URL that botocore makes locally for the host, port and
user, valid 15 minutes and only for the login: each new connection gets one made for it. Azure: a Microsoft
Entra token of the host's managed identity, kept while it has over a minute to live (its own ``expires_on``)
and asked for again after. boto3 and azure-identity, which the Agent embeds, are imported only here, and only
for a section that asks for them.

A token is a password: it is never logged, and ``redact`` masks the shapes of both kinds wherever a text
might carry one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

AZURE_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"
REFRESH_MARGIN = 60.0  # seconds: a token with less to live than this is not used for a new login
ROLE_SESSION_NAME = "datadog-django-db"
# botocore logs a presigned request's signature at DEBUG: its records are dropped while this check signs.
SIGNING_LOGGERS = ("botocore.auth", "botocore.signers")


class _Signing(logging.Filter):
    """Drops botocore's records on a thread while it makes a token there."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "on", False)


_SIGNING = _Signing()


@dataclass(frozen=True)
class ManagedAuth:
    """How a postgres or mysql section logs in without a password."""

    kind: str  # aws or azure
    region: str = ""
    role_arn: str = ""
    client_id: str = ""
    scope: str = AZURE_SCOPE


def azure_credential(client_id: str, timeout: float) -> Any:
    """The host's managed identity (a user-assigned one with ``client_id``), as azure-identity gives it; its
    requests bounded by the section's connect_timeout and tried once more at most."""
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential(
        client_id=client_id or None, connection_timeout=timeout, read_timeout=timeout, retry_total=1
    )


def aws_client(region: str, credentials: dict[str, str] | None = None) -> Any:
    """boto3's RDS client in the region: the default credentials of the host, or the role's."""
    import boto3

    return boto3.session.Session(region_name=region, **(credentials or {})).client("rds", region_name=region)


def assume_role(region: str, role_arn: str, timeout: float) -> tuple[dict[str, str], float]:
    """The role's temporary credentials, and when they expire (epoch seconds): one request to STS, bounded."""
    import boto3
    from botocore.config import Config

    bounded = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
    sts = boto3.session.Session(region_name=region).client("sts", region_name=region, config=bounded)
    found = sts.assume_role(RoleArn=role_arn, RoleSessionName=ROLE_SESSION_NAME)["Credentials"]
    credentials = {
        "aws_access_key_id": found["AccessKeyId"],
        "aws_secret_access_key": found["SecretAccessKey"],
        "aws_session_token": found["SessionToken"],
    }
    return credentials, found["Expiration"].timestamp()


class Tokens:
    """The password of each new connection of one section."""

    def __init__(self, auth: ManagedAuth, host: str, port: int, user: str, timeout: float):
        self.auth, self.host, self.port, self.user, self.timeout = auth, host, port, user, timeout
        self._client: Any = None  # boto3's RDS client, kept: making it costs far more than a token
        self._role_until = 0.0  # when the assumed role's credentials expire
        self._credential: Any = None
        self._token: tuple[str, float] | None = None  # an Azure token and when it expires (epoch seconds)

    def password(self) -> str:
        if self.auth.kind == "aws":
            return self._aws()
        return self._azure()

    def _aws(self) -> str:
        region, role_arn = self.auth.region, self.auth.role_arn
        if role_arn and self._role_until - REFRESH_MARGIN <= time.time():
            credentials, self._role_until = assume_role(region, role_arn, self.timeout)
            self._client = aws_client(region, credentials)
        elif self._client is None:
            self._client = aws_client(region)
        for name in SIGNING_LOGGERS:
            logging.getLogger(name).addFilter(_SIGNING)  # once: a filter is added at most once
        _SIGNING.active.on = True
        try:
            token: str = self._client.generate_db_auth_token(
                DBHostname=self.host, Port=self.port, DBUsername=self.user, Region=self.auth.region
            )
        finally:
            _SIGNING.active.on = False
        return token

    def _azure(self) -> str:
        now = time.time()
        if self._token is None or self._token[1] - REFRESH_MARGIN <= now:
            if self._credential is None:
                self._credential = azure_credential(self.auth.client_id, self.timeout)
            found = self._credential.get_token(self.auth.scope)
            self._token = (str(found.token), float(found.expires_on))
        return self._token[0]
