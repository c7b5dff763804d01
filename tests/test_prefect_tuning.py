"""What pgbackflow changes in how Prefect runs in its processes (flows/prefect_tuning.py), and
the pieces that keep a command's Prefect bookkeeping short (flows/common.py).

Against the session's real ``prefect server`` where an API is involved: the contexts checked
are the ones Prefect's own clients hold once they have talked to it.
"""

from __future__ import annotations

import contextvars
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import certifi
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    get_current_settings,
    temporary_settings,
)

from pgbackflow.flows.common import (
    HEARTBEAT_S,
    Background,
    cli_heartbeats,
    heartbeat_settings,
    in_parallel,
)
from pgbackflow.flows.prefect_tuning import TLS_CONTEXT_MODULES, SharedVerifiedContexts


def _tls_context(client: Any) -> ssl.SSLContext:
    """The SSL context of a Prefect client's httpx connection pool (httpx 0.28, httpcore 1)."""
    context = client._client._transport._pool._ssl_context
    assert isinstance(context, ssl.SSLContext)
    return context


def test_prefect_clients_share_one_verifying_context(prefect_api: str) -> None:
    """Each Prefect client used to load the CA bundle anew (~15 ms, four times per backup)."""
    with get_client(sync_client=True) as first, get_client(sync_client=True) as second:
        assert first.hello().status_code == 200
        assert second.hello().status_code == 200
        shared = _tls_context(first)
        assert _tls_context(second) is shared
    assert shared.verify_mode == ssl.CERT_REQUIRED
    assert shared.check_hostname


@pytest.mark.parametrize("module", TLS_CONTEXT_MODULES)
def test_prefect_modules_see_the_shared_contexts(module: str) -> None:
    """Fails when a Prefect upgrade moves how these modules make their contexts."""
    import importlib

    assert isinstance(importlib.import_module(module).ssl, SharedVerifiedContexts)


def test_turned_off_tls_checks_do_not_leak_into_verifying_clients(prefect_api: str) -> None:
    """Prefect changes an unverified context after making it: never one that is shared."""
    with temporary_settings(updates={PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}), \
            get_client(sync_client=True) as insecure:
        unverified = _tls_context(insecure)
    with get_client(sync_client=True) as secure:
        verified = _tls_context(secure)
    assert unverified is not verified
    assert unverified.verify_mode == ssl.CERT_NONE
    assert verified.verify_mode == ssl.CERT_REQUIRED


def test_a_changed_ca_file_gives_a_new_context(tmp_path: Path) -> None:
    shared = SharedVerifiedContexts()
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    first = shared.create_default_context(cafile=str(bundle))
    assert shared.create_default_context(cafile=str(bundle)) is first
    later = time.time() + 5
    os.utime(bundle, (later, later))
    assert shared.create_default_context(cafile=str(bundle)) is not first
    # Contexts without a CA file (their callers change them) are made each time.
    assert shared.create_default_context() is not shared.create_default_context()
    with pytest.raises((FileNotFoundError, ssl.SSLError)):
        shared.create_default_context(cafile=str(tmp_path / "missing.pem"))


def test_in_parallel_runs_the_calls_at_once_with_the_callers_context() -> None:
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")
    marker.set("the caller's")
    both_running = threading.Barrier(2, timeout=5)  # one after the other: BrokenBarrierError
    seen: list[str] = []

    def call() -> None:
        both_running.wait()
        seen.append(marker.get())

    in_parallel(call, call)
    assert seen == ["the caller's", "the caller's"]


def test_in_parallel_raises_the_first_error_after_every_call_ended() -> None:
    ended: list[str] = []

    def fails() -> None:
        raise ValueError("first")

    def slow() -> None:
        time.sleep(0.3)
        ended.append("slow")

    def also_fails() -> None:
        raise KeyError("second")

    with pytest.raises(ValueError, match="first"):
        in_parallel(slow, fails, also_fails)
    assert ended == ["slow"]


def test_background_runs_while_the_caller_goes_on() -> None:
    release = threading.Event()
    started = time.monotonic()
    waiting = Background(lambda: release.wait(5) and "done")
    assert time.monotonic() - started < 1, "Background waited for its call"
    release.set()
    assert waiting.result() == "done"

    def fails() -> str:
        raise RuntimeError("API down")

    failing = Background(fails)
    with pytest.raises(RuntimeError, match="API down"):
        failing.result()


def test_heartbeat_settings_are_built_once_per_base(prefect_api: str) -> None:
    base = get_current_settings()
    with_beats = heartbeat_settings(base)
    assert heartbeat_settings(base) is with_beats
    assert with_beats.flows.heartbeat_frequency == HEARTBEAT_S
    assert with_beats.api.url == base.api.url
    with cli_heartbeats():
        assert get_current_settings() is with_beats
    # Without a Prefect server (the ephemeral API dies with the process): no heartbeats.
    with temporary_settings(updates={PREFECT_API_URL: None}):
        local = get_current_settings()
        assert heartbeat_settings(local).flows.heartbeat_frequency is None
    # One entry is kept: the base a command starts from again is built again, the same way.
    assert heartbeat_settings(base).flows.heartbeat_frequency == HEARTBEAT_S
