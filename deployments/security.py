"""The security of the Prefect side: what ``pgbackflow doctor`` and ``pgbackflow deploy`` check.

Three things make a Prefect server a weak point for backups (see README, "From the demo to
production"):

- **No authentication**: anyone who reaches the API runs flows, and reads every block's
  secrets (``GET /api/block_documents/{id}?include_secrets=true``). Prefect 3's basic auth:
  ``PREFECT_SERVER_API_AUTH_STRING=user:password`` on the server, the same in
  ``PREFECT_API_AUTH_STRING`` on every client and worker. Checked by asking the API
  without credentials (its health paths are the only ones it answers then).
- **No PREFECT_SERVER_ENCRYPTION_KEY**: block documents are Fernet-encrypted, but the server
  then keeps the Fernet key in the same database, so a copy of it holds every secret. The
  server reads the variable straight from its own environment: no API shows it, so it is
  checked in the environment the doctor runs in, which must be the server's to tell.
- **SQLite**: fine for a try; under concurrent scheduled runs it answers 503 "database is
  locked". The server's ``/api/admin/settings`` shows the driver when it was set on its own
  (``PREFECT_SERVER_DATABASE_DRIVER``/``_HOST``) but hides the connection URL, so the
  environment the doctor runs in is consulted too.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from pgbackflow.tasks.errors import ConfigError, PgBackflowError

AUTH_ADVICE = (
    "set PREFECT_SERVER_API_AUTH_STRING=user:password on the server and the same "
    "PREFECT_API_AUTH_STRING on every client and worker"
)
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True)
class Finding:
    """One check's outcome: one line.

    Attributes:
        level: ``ok``, ``warning`` or ``note`` (could not be checked from here).
        check: ``api``, ``auth``, ``encryption-key`` or ``database``.
        message: What was found and, for a warning, what to do.
    """

    level: Literal["ok", "warning", "note"]
    check: str
    message: str

    def line(self) -> str:
        """``level: message``."""
        return f"{self.level}: {self.message}"


def _get(http: httpx.Client, url: str, auth: str | None) -> httpx.Response:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    for attempt in range(5):
        response = http.get(url, headers=headers)
        if response.status_code != 503:  # SQLite "database is locked": the client retries
            return response
        time.sleep(0.5 * (attempt + 1))
    return response


def _is_here(api_url: str) -> bool:
    host = urlsplit(api_url).hostname or ""
    return host in _LOOPBACK or host in {socket.gethostname(), socket.getfqdn()}


def _local_database() -> str:
    """The database dialect a Prefect server started in this environment would use."""
    from prefect.settings import get_current_settings

    database = get_current_settings().server.database
    if database.driver:
        return database.driver.split("+")[0]
    url = database.connection_url
    text = url.get_secret_value() if url is not None else ""
    return text.split(":", 1)[0].split("+")[0] or "sqlite"


def _encryption_key_finding(where: str) -> Finding:
    key = os.environ.get("PREFECT_SERVER_ENCRYPTION_KEY")
    if not key:
        return Finding(
            "warning", "encryption-key",
            f"PREFECT_SERVER_ENCRYPTION_KEY is not set {where}: the server then keeps the key "
            "that encrypts block secrets in its own database, so a copy of the database holds "
            "every password and key in blocks: set it on the server (a Fernet key, e.g. from "
            "python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())', kept in a secret file outside the "
            "database), and keep the master key out of blocks ([key] file)",
        )
    try:
        valid = len(base64.urlsafe_b64decode(key.encode())) == 32
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return Finding(
            "warning", "encryption-key",
            f"PREFECT_SERVER_ENCRYPTION_KEY {where} is not a Fernet key (32 url-safe base64 "
            "bytes): the server cannot encrypt blocks with it; generate one with "
            "Fernet.generate_key()",
        )
    return Finding("ok", "encryption-key", f"PREFECT_SERVER_ENCRYPTION_KEY is set {where}")


def _database_finding(dialect: str, where: str, scheduled: bool) -> Finding:
    if dialect == "sqlite":
        use = "the schedules of this config" if scheduled else "scheduled work"
        return Finding(
            "warning", "database",
            f"the Prefect server's database is SQLite ({where}): it answers 503 'database is "
            f"locked' under concurrent runs, not fit for {use}: use PostgreSQL "
            "(PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://...)",
        )
    return Finding("ok", "database", f"the Prefect server's database is {dialect} ({where})")


def check_prefect_security(*, scheduled: bool = False) -> list[Finding]:
    """The findings about the Prefect API this environment uses, one per check.

    Args:
        scheduled: Called by a deploy (its schedules are about to run on this server).

    Raises:
        PgBackflowError: the API cannot be reached, or refuses this environment's
            credentials (one line saying what to set).
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    api_url = settings.api.url
    findings: list[Finding] = []
    if not api_url:
        findings.append(Finding(
            "warning", "api",
            "PREFECT_API_URL is not set: each command starts a temporary local Prefect API "
            "(SQLite, gone when it ends); schedules and workers need a Prefect server: set "
            "PREFECT_API_URL=http://HOST:4200/api",
        ))
        findings.append(_encryption_key_finding("in this environment"))
        findings.append(_database_finding(_local_database(), "this environment's", scheduled))
        return findings
    base = api_url.rstrip("/")
    secret = settings.api.auth_string
    auth = secret.get_secret_value() if secret is not None else None
    try:
        with httpx.Client(timeout=15) as http:
            anonymous = _get(http, f"{base}/admin/version", None)
            mine = _get(http, f"{base}/admin/settings", auth)
    except httpx.HTTPError as exc:
        raise PgBackflowError(
            f"the Prefect API at {api_url} cannot be reached ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no answer'}): check PREFECT_API_URL "
            "and that the server runs"
        ) from None
    if anonymous.status_code == 200:
        findings.append(Finding(
            "warning", "auth",
            f"the Prefect API at {api_url} answers without authentication: anyone who reaches "
            "it can run flows and read block secrets (include_secrets=true): " + AUTH_ADVICE,
        ))
    elif anonymous.status_code in (401, 403):
        findings.append(Finding("ok", "auth",
                                f"the Prefect API at {api_url} requires authentication"))
    if mine.status_code in (401, 403):
        raise ConfigError(
            f"the Prefect API at {api_url} refuses this environment's credentials (HTTP "
            f"{mine.status_code}): "
            + ("set PREFECT_API_AUTH_STRING to the server's user:password" if auth is None
               else "PREFECT_API_AUTH_STRING does not match the server's auth string")
        )
    if mine.status_code != 200:
        raise PgBackflowError(
            f"the Prefect API at {api_url} answered HTTP {mine.status_code} to "
            "/admin/settings: is it a Prefect 3 server?"
        )
    if "api.prefect.cloud" in base:
        return findings  # Prefect Cloud: its database and encryption are not ours to check
    server: dict[str, Any] = mine.json().get("server", {})
    driver = str((server.get("database") or {}).get("driver") or "")
    if _is_here(api_url):
        findings.append(_encryption_key_finding("in this environment (the server's here)"))
        dialect = driver.split("+")[0] if driver else _local_database()
        findings.append(_database_finding(dialect, "its settings here", scheduled))
        return findings
    findings.append(Finding(
        "note", "encryption-key",
        f"PREFECT_SERVER_ENCRYPTION_KEY of the server at {api_url} not checked: no API shows "
        "it; run pgbackflow doctor where the server runs, with its environment",
    ))
    if driver:
        findings.append(_database_finding(driver.split("+")[0], "its API says", scheduled))
    else:
        findings.append(Finding(
            "note", "database",
            f"the database of the server at {api_url} not checked: its API hides the "
            "connection URL; run pgbackflow doctor where the server runs, or set "
            "PREFECT_SERVER_DATABASE_DRIVER there",
        ))
    return findings
