"""Two changes to how Prefect 3.8 runs in a pgbackflow process, both for time a user waits.

``prefect`` is pinned to 3.8.x (constraints.txt); each change replaces a private detail,
and tests/test_cli_heartbeats.py and tests/test_prefect_tuning.py fail if one moves.
"""

from __future__ import annotations

import contextvars
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("pgbackflow.flows")


def tune_prefect() -> None:
    """Apply both (idempotent)."""
    heartbeats_stopping_at_once()
    shared_tls_contexts()


def heartbeats_stopping_at_once() -> None:
    """Replace Prefect 3.8's flow-run heartbeat thread with one that stops at once.

    Prefect's thread sleeps in 1 s steps and each run's end joins it: up to a second per
    flow run (a CLI command, and every subflow of a 50-database ``backup-databases`` run).
    This one waits on its stop event, so the join returns at once. Same events, same
    interval. ``prefect`` is pinned to 3.8.x; tests/test_cli_heartbeats.py fails if this
    private hook changes.
    """
    import prefect.flow_engine as engine_module

    if getattr(engine_module._send_heartbeats, "stops_at_once", False):
        return

    @contextmanager
    def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
        interval = engine.heartbeat_seconds
        if interval is None:
            yield
            return
        interval = max(interval, engine_module.MINIMUM_HEARTBEAT_INTERVAL)
        resource, related = engine._build_heartbeat_event_template()
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                state = engine.flow_run.state if engine.flow_run else None
                if state is not None and state.is_final():
                    return
                try:
                    engine._emit_flow_run_heartbeat(resource, related)
                except Exception:
                    logger.debug("flow-run heartbeat not sent", exc_info=True)
                stop.wait(interval)

        # The thread must see this context's settings (PREFECT_API_URL), as Prefect's does.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,),
                                  daemon=True, name="pgbackflow-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            if join_on_exit:
                thread.join(timeout=2)

    send_heartbeats.stops_at_once = True  # type: ignore[attr-defined]
    engine_module._send_heartbeats = send_heartbeats


class SharedVerifiedContexts:
    """The ``ssl`` module as Prefect's API clients see it, except that a verifying context
    for a CA file is made once per file (and its mtime) and then shared.

    Prefect builds an ``ssl.create_default_context(cafile=certifi.where())`` for every API
    client it creates, even for an ``http://`` API: ~15 ms of loading the CA bundle each
    time, four times on a backup's critical path (the run's client, the concurrency
    limit's, the event client's version check). A verifying context is never changed after
    it is made (Prefect passes it to httpx as ``verify``; httpcore sets the same ALPN
    protocols on it for every connection of a process), so one can serve every client, as
    one serves every connection of a client. Unverified contexts (TLS checks turned off)
    are made each time: their callers change them after making them.
    """

    def __init__(self) -> None:
        self._contexts: dict[tuple[str, int], ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    def create_default_context(
        self, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *, cafile: str | None = None,
        capath: str | None = None, cadata: str | bytes | None = None,
    ) -> ssl.SSLContext:
        if cafile is None or capath is not None or cadata is not None \
                or purpose is not ssl.Purpose.SERVER_AUTH:
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath,
                                              cadata=cadata)
        try:
            key = (os.fspath(cafile), os.stat(cafile).st_mtime_ns)
        except OSError:  # let ssl say what is wrong with the file
            return ssl.create_default_context(purpose, cafile=cafile)
        with self._lock:
            context = self._contexts.get(key)
            if context is None:
                context = ssl.create_default_context(purpose, cafile=cafile)
                self._contexts[key] = context
            return context


#: Prefect 3.8 modules that make a verifying context for each client or connection.
TLS_CONTEXT_MODULES = ("prefect.client.orchestration", "prefect._internal.version_checking",
                       "prefect._internal.websockets")


def shared_tls_contexts() -> None:
    """Give Prefect's client modules a :class:`SharedVerifiedContexts` as their ``ssl``."""
    import importlib

    shared = SharedVerifiedContexts()
    for name in TLS_CONTEXT_MODULES:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "ssl", None), SharedVerifiedContexts):
            module.ssl = shared  # type: ignore[attr-defined]
