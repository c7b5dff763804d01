"""What every pgbackflow flow shares: retry policy, keys, storages, progress, artifacts."""

from __future__ import annotations

import collections
import contextvars
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar, cast
from uuid import UUID

from prefect import Task, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from pgbackflow.blocks.encryption import BackupEncryptionKey
from pgbackflow.blocks.storage import LocalStorage, S3Storage
from pgbackflow.deployments.tags import run_tags
from pgbackflow.flows.prefect_tuning import tune_prefect
from pgbackflow.tasks.errors import ConfigError, StorageError
from pgbackflow.tasks.keys import (
    Keyring,
    MasterKey,
    default_key_file,
    load_key_file,
    load_or_create_key_file,
    new_key_warning,
)
from pgbackflow.tasks.pipeline import ObjectWrite
from pgbackflow.tasks.process import note_done
from pgbackflow.tasks.reports import BackupReport, DestinationStatus
from pgbackflow.tasks.storage import Storage

StorageBlock = LocalStorage | S3Storage

logger = logging.getLogger("pgbackflow.flows")

#: How long a finished progress artifact may take to say "done" before the run goes on.
PROGRESS_FLUSH_TIMEOUT_S = 30.0
#: Least seconds between two updates of a progress artifact (the CLI's bar is not throttled).
PROGRESS_UPDATE_INTERVAL_S = 10.0


def _retry_delays() -> list[float]:
    """Seconds between retries of transient failures; PGBACKFLOW_RETRY_DELAYS="5,30,120"."""
    text = os.environ.get("PGBACKFLOW_RETRY_DELAYS", "5,30,120")
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"PGBACKFLOW_RETRY_DELAYS={text!r} is not a comma-separated list of seconds"
        ) from None


#: Seconds between retries of a transient failure (connection refused, S3 5xx, timeouts).
RETRY_DELAYS: list[float] = _retry_delays()

# The CLI draws a progress bar from these; flows also feed the Prefect progress artifact.
progress_listeners: list[Callable[[str, int, int | None], None]] = []
# The CLI prints these ("database … not reachable (connection refused); retry 1 of 3 in 5 s"):
# its console shows no Prefect logs, and a retrying run must not look hung.
retry_listeners: list[Callable[[str], None]] = []
# The last backup whose manifest this process published (one: a long-lived process must not
# collect them). When the Prefect API fails after that point the CLI reports the backup
# complete rather than the run failed.
published_backups: collections.deque[BackupReport] = collections.deque(maxlen=1)


#: Seconds between flow-run heartbeats (Prefect's minimum); deployments set the same.
HEARTBEAT_S = 30


def prefect_api_url() -> str | None:
    """The persistent Prefect API runs report to, or None for Prefect's ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextmanager
def cli_heartbeats() -> Iterator[None]:
    """Run the command's flows with flow-run heartbeats when they report to a Prefect server.

    Against a persistent API (PREFECT_API_URL set) someone watches the runs in the UI: with
    heartbeats, the "crash unresponsive runs" automation marks the runs of a command killed
    with -9 (or of a lost host) Crashed instead of Running forever. The ephemeral API has no
    automations and dies with the process, so no heartbeats there.
    """
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    with SettingsContext(profile=context.profile, settings=heartbeat_settings(context.settings)):
        # Before the run's first heartbeat: the automation only watches runs whose heartbeat
        # it has seen, so a command killed before its second one (30 s) would stay Running.
        ensure_lost_run_detection()
        yield


# (the settings a command starts from, those with the heartbeat frequency): one entry.
_heartbeat_settings: list[tuple[Any, Any]] = []


def heartbeat_settings(base: Any) -> Any:
    """``base`` with the CLI's heartbeat frequency, built once per ``base``.

    Building a Prefect Settings object validates every setting again (~40 ms): the CLI's
    daemon builds it while it warms up, so its commands find it made (pgbackflow/daemon.py).
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    for known_base, settings in _heartbeat_settings:
        if known_base is base:
            return settings
    frequency = HEARTBEAT_S if base.api.url else None
    settings = base.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: frequency})
    _heartbeat_settings[:] = [(base, settings)]
    return settings


tune_prefect()


# API URLs on which this process made sure the lost-run automation exists.
_lost_run_detection_on: set[str] = set()


def ensure_lost_run_detection() -> None:
    """Create the "crash unresponsive runs" automation if the Prefect server lacks it.

    Heartbeats alone mark nothing: that automation turns their silence into Crashed. It is
    created by ``pgbackflow deploy``; a server only ever used from the CLI gets it from the
    first run that sends heartbeats (one lookup per process). One already there, even
    paused by its operator, is left as it is. Never fails a run.
    """
    from prefect.settings import get_current_settings

    url = prefect_api_url()
    if not url or url in _lost_run_detection_on:
        return
    if get_current_settings().flows.heartbeat_frequency is None:
        return
    _lost_run_detection_on.add(url)
    from pgbackflow.deployments.automations import zombie_automation

    spec = zombie_automation()
    try:
        if not lost_run_detection_exists():
            spec.build().create()
    except Exception as exc:
        logger.warning("automation %r not created: %s", spec.name, exc)


def lost_run_detection_exists() -> bool:
    """Whether the Prefect API has the "crash unresponsive runs" automation; if so, this
    process does not ask again (the CLI's daemon asks while it warms up). Raises what the
    API raises."""
    from prefect.client.orchestration import get_client

    from pgbackflow.deployments.automations import zombie_automation

    name = zombie_automation().name
    with get_client(sync_client=True) as client:
        found = bool(client.read_automations_by_name(name))
    if found and (url := prefect_api_url()):
        _lost_run_detection_on.add(url)
    return found


def tag_run(job: str, db_id: str | None) -> None:
    """Add the run tags to the current flow run (deployment runs already carry most of them).

    Called first thing with the id the block names, before any connection (so a run that
    fails on a wrong password is still tagged), and again once a derived id is known. Outside
    a flow run, or if the API refuses: nothing (tags are for selection, never fail a backup).
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    if context.flow_run.parent_task_run_id is None:
        ensure_lost_run_detection()
    wanted = run_tags(job, db_id)
    current = list(context.flow_run.tags)
    missing = [tag for tag in wanted if tag not in current]
    if not missing:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(context.flow_run.id, tags=current + missing)
        context.flow_run.tags = current + missing
    except Exception as exc:
        logger.warning("flow run not tagged %s: %s", ", ".join(missing), exc)


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect retry condition: retry only errors marked transient (see tasks.errors).

    A wrong password or a missing database fails at once instead of three more times. Each
    retry says what it waits for (run log and `retry_listeners`): a wrong port otherwise
    looks like a hang for the minutes the retries take.
    """
    try:
        state.result(raise_on_failure=True)
    except Exception as exc:
        if not getattr(exc, "transient", False):
            return False
        _announce_retry(task, task_run, exc)
        return True
    return False


def _announce_retry(task: Task[..., Any], task_run: TaskRun, exc: Exception) -> None:
    """Log "WHAT; retry N of M in S s" and tell the listeners (the CLI prints it)."""
    # Prefect asks this condition only while retries remain; run_count is the attempts so far.
    attempt = max(1, task_run.run_count)
    delays = task.retry_delay_seconds
    if isinstance(delays, list):
        delay = float(delays[min(attempt - 1, len(delays) - 1)]) if delays else 0.0
    else:
        delay = float(delays or 0)
    what = getattr(exc, "waiting_for", None) or str(exc)
    line = f"{what}; retry {attempt} of {task.retries} in {delay:g} s"
    try:
        get_run_logger().warning("%s", line)
    except MissingContextError:
        logger.warning("%s", line)
    for listener in retry_listeners:
        listener(line)


T = TypeVar("T")


def stage_as_task(stage: str, work: Callable[[], T]) -> T:
    """The flows' :class:`tasks.runtime.StageRunner`: a restore stage (``work``) as a task
    run named ``stage``, so the UI shows each stage's state and timing. Not cached, not
    retried: a stage that fails is reported by the restore that ran it."""
    return task(name=stage, cache_policy=NONE)(work)()


def open_storages(blocks: Sequence[StorageBlock]) -> list[Storage]:
    """Storage backends for the given storage blocks.

    Raises:
        ConfigError: Two of them are the same place (``/x`` and ``file:///x/``): that is
            one copy, not two, and two writers of one backup racing in one folder.
    """
    storages: list[Storage] = [block.open() for block in blocks]
    check_distinct_storages(storages)
    return storages


def check_distinct_storages(storages: Sequence[Storage]) -> None:
    """Raise ConfigError when two storages are the same place."""
    seen: set[tuple[str, str]] = set()
    for storage in storages:
        place = (storage.location, str(getattr(storage, "endpoint", "")))
        if place in seen:
            raise ConfigError(
                f"storage {storage.location} is named twice (the same place however it is "
                "spelled): name each storage once; a second copy needs another place"
            )
        seen.add(place)


def resolve_master_key(
    encryption_key: BackupEncryptionKey | None, key_file: str | None
) -> MasterKey:
    """The key to encrypt with: the block, a named key file, or the default key file.

    The default key file is created on first use, with a loud one-time warning.
    """
    if encryption_key is not None:
        return encryption_key.master_key()
    if key_file is not None:
        return load_key_file(Path(key_file))
    path = default_key_file()
    key, created = load_or_create_key_file(path)
    if created and FlowRunContext.get() is not None:
        get_run_logger().warning(new_key_warning(path, key))
    return key


def resolve_keyring(encryption_key: BackupEncryptionKey | None, key_file: str | None) -> Keyring:
    """Keys a restore may decrypt with."""
    if encryption_key is not None:
        return encryption_key.keyring()
    if key_file is not None:
        return Keyring([load_key_file(Path(key_file))])
    key, _ = load_or_create_key_file()
    return Keyring([key])


def artifact_key(*parts: str) -> str:
    """An artifact key from free text: lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", text)).strip("-")[:100]


def publish_summary(
    kind: str,
    db_id: str,
    markdown: str,
    description: str,
    rows: list[dict[str, Any]] | None = None,
) -> None:
    """A markdown summary (and optionally a table) keyed per database, so the UI's artifact
    page shows the latest of each kind for each database. Outside a flow run: nothing."""
    if FlowRunContext.get() is None:
        return

    def send_markdown() -> None:
        create_markdown_artifact(markdown, key=artifact_key(kind, db_id), description=description)

    def send_table() -> None:
        create_table_artifact(
            rows or [], key=artifact_key(f"{kind}-tables", db_id), description=description
        )

    # Two independent API calls: sent at once.
    in_parallel(send_markdown, *([send_table] if rows is not None else []))


class Background(Generic[T]):
    """``call()`` started now on a thread of its own, with this thread's context (the flow
    run, the settings); :meth:`result` waits for it. For Prefect API calls a run needs
    later, sent while it does its work (pg_dump) instead of before or after it."""

    def __init__(self, call: Callable[[], T], name: str = "pgbackflow-background") -> None:
        self._call = call
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._run,), name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Kept for result(): an exception escaping a thread is a traceback on stderr.
        try:
            self._value = self._call()
        except BaseException as exc:
            self._error = exc

    def result(self) -> T:
        """The call's value, once it has ended; raises its error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def in_parallel(*calls: Callable[[], None]) -> None:
    """Run ``calls`` at once (the first on this thread, the others in the
    :class:`Background`) and wait for all of them. For independent Prefect API calls at the
    end of a run, where each round trip adds to the time a user waits. Raises the first
    call's error there is, after all have ended."""
    started = [Background(call, f"pgbackflow-parallel-{n}") for n, call in enumerate(calls[1:])]
    errors: list[BaseException] = []
    try:
        if calls:
            calls[0]()
    except BaseException as exc:
        errors.append(exc)
    for other in started:
        try:
            other.result()
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


class ProgressArtifact:
    """A Prefect progress artifact plus the in-process listeners (the CLI's progress bar).

    The artifact's API calls run on a background thread, at most one update per
    PROGRESS_UPDATE_INTERVAL_S with the newest value (stale ones dropped), so the data path
    never waits for the Prefect API; a failing API only loses progress display, never the run.
    Use it as a context manager: a run that fails says where it stopped.

    Args:
        key: Artifact key (shown in the UI's artifacts page).
        label: What is progressing, for listeners.
        total: Expected total bytes, if known.
    """

    def __init__(self, key: str, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self._done = 0
        self._percent = 0.0
        self._pending: tuple[float, str] | None = None
        self._finished = False
        self._wake = threading.Condition()
        self._publisher: threading.Thread | None = None
        if FlowRunContext.get() is not None:
            self._publisher = threading.Thread(
                target=contextvars.copy_context().run, args=(self._publish, key),
                name="pgbackflow-progress", daemon=True,
            )
            self._publisher.start()
        self.update(0)

    def __enter__(self) -> ProgressArtifact:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Leaving by an exception before `finish`: the artifact says where it stopped."""
        if exc_type is not None and not self._finished:
            self._post(self._percent, f"{self.label}: stopped after {self._done / 1e6:.0f} MB",
                       last=True)
            self._join()

    def update(self, done: int) -> None:
        """Report ``done`` bytes."""
        for listener in progress_listeners:
            listener(self.label, done, self.total)
        self._done = done
        self._percent = min(99.0, 100.0 * done / self.total) if self.total else 0.0
        estimate = f" of ~{self.total / 1e6:.0f} MB" if self.total else ""
        self._post(self._percent, f"{self.label}: {done / 1e6:.0f} MB{estimate}")

    def finish(self, done: int) -> None:
        """Mark complete (waits until the artifact says so)."""
        for listener in progress_listeners:
            listener(self.label, done, done)
        self._post(100.0, f"{self.label}: done, {done / 1e6:.1f} MB", last=True)
        self._join()

    def _join(self) -> None:
        if self._publisher is not None:
            self._publisher.join(timeout=PROGRESS_FLUSH_TIMEOUT_S)

    def _post(self, percent: float, description: str, *, last: bool = False) -> None:
        if self._publisher is None:
            self._finished = self._finished or last
            return
        with self._wake:
            self._pending = (percent, description)
            self._finished = self._finished or last
            self._wake.notify()

    def _publish(self, key: str) -> None:
        try:
            artifact_id = cast(
                UUID, create_progress_artifact(0.0, key=key, description=f"{self.label}: starting")
            )
            while True:
                with self._wake:
                    while self._pending is None and not self._finished:
                        self._wake.wait()
                    pending, self._pending = self._pending, None
                if pending is None:
                    return  # finished and everything sent
                update_progress_artifact(artifact_id, pending[0], description=pending[1])
                with self._wake:
                    # Every update costs the API server too: at most one per interval.
                    self._wake.wait_for(lambda: self._finished, PROGRESS_UPDATE_INTERVAL_S)
        except Exception as exc:  # progress is display only: never fail the run for it
            logger.warning("progress artifact %s not updated: %s", key, exc)


class BackupIncompleteError(StorageError):
    """The backup is complete in some storages but not all."""


def raise_if_incomplete(backup_id: str, statuses: Sequence[DestinationStatus]) -> None:
    """Fail the run when a storage did not get the whole backup (the others keep it)."""
    failed = [s for s in statuses if s.status == "failed"]
    if failed:
        good = ", ".join(s.location for s in statuses if s.status == "complete") or "nowhere"
        reasons = "; ".join(f"{s.location}: {s.error}" for s in failed)
        raise BackupIncompleteError(
            f"backup {backup_id} is complete in {good} but failed in {reasons}"
        )


def write_statuses(storages: Sequence[Storage], *writes: ObjectWrite) -> list[DestinationStatus]:
    """Per storage: complete if every object went through, else the first error."""
    statuses = []
    for storage in storages:
        errors = [o.error for w in writes for o in w.outcomes
                  if o.location == storage.location and o.error]
        statuses.append(DestinationStatus(
            location=storage.location,
            status="failed" if errors else "complete",
            error=errors[0] if errors else None,
        ))
    return statuses


def publish_everywhere(
    storages: Sequence[Storage], publish: Callable[[Storage], None], what: str
) -> list[DestinationStatus]:
    """Write ``what``'s manifest to each storage; a storage that refuses is reported, not
    fatal. Each one written is noted (:func:`tasks.process.note_done`): interrupted after
    it, the command says the backup is there."""
    statuses = []
    for storage in storages:
        try:
            publish(storage)
            note_done(f"{what} had been stored complete in {storage.location}")
            statuses.append(DestinationStatus(location=storage.location, status="complete"))
        except StorageError as exc:
            statuses.append(
                DestinationStatus(location=storage.location, status="failed", error=str(exc))
            )
    return statuses
