"""Backup manifests, their authentication, and the catalog of backups in a storage.

A manifest is written last, after every object of the backup is complete; a backup without
a manifest does not exist for any reader. Manifests are JSON (no secrets: sizes, checksums,
table names and counts) so listing needs no key.

Whoever can write to the storage can write manifests, so every manifest carries a MAC
(HMAC-SHA256 under a key derived from the master key) that also binds it to where it is
stored: database id, backup id and storage key (docs/FORMAT.md, "Manifests"). Readers
that hold a key use only manifests whose MAC verifies; ids read from storage are checked
against a strict pattern before they are used in a storage key or a path.

Layout in a storage::

    logical/<db_id>/<backup_id>/dump.pgbf      pg_dump custom archive, encrypted
    logical/<db_id>/<backup_id>/globals.pgbf   pg_dumpall --globals-only, encrypted
    logical/<db_id>/<backup_id>/manifest.json  this manifest
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import struct
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError, PgBackflowError
from pgbackflow.tasks.keys import WRONG_KEY_HINT, Keyring, MasterKey
from pgbackflow.tasks.storage import Storage
from pgbackflow.tasks.storage.base import LOGICAL_ROOT as LOGICAL_ROOT

MANIFEST_NAME = "manifest.json"
MAC_SCHEME = "pgbackflow-manifest-mac-v1"
_MAC_LABEL = MAC_SCHEME.encode("ascii") + b"\x00"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""A manifest larger than this is refused unread (a table list of ~500k tables fits)."""

# Ids name folders and storage keys: letters, digits, '_', '.', '-'; never starting with
# '.' or '-' (no '.', '..', hidden names or option-like arguments), at most 128.
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

logger = logging.getLogger("pgbackflow.manifest")

ManifestStatus = Literal["verified", "unverified", "no-mac", "failed"]
"""verified: MAC checked with a held key. unverified: has a MAC, but no key was given.
no-mac: written without a MAC (older pgbackflow, or stripped). failed: refused (why in
``problem``)."""


# ---------------------------------------------------------------------------------------
# Errors


class InvalidIdError(ConfigError):
    """An id (database, backup, segment) does not match the strict id pattern."""


class ManifestError(PgBackflowError):
    """A manifest cannot be used: unreadable, malformed, or stored where it does not belong."""


class ManifestAuthenticationError(ManifestError):
    """A manifest's MAC does not verify, is missing, or is under a key that was not given."""


class ManifestKeyError(ManifestAuthenticationError):
    """A manifest is authenticated with a master key that is not in the keyring."""


# ---------------------------------------------------------------------------------------
# Ids and paths


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is a string matching the id pattern."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`InvalidIdError`.

    Args:
        value: The id, from user input or from storage.
        what: What it names ("backup id", "database id", ...), for the message.
    """
    if not is_valid_id(value):
        raise InvalidIdError(
            f"{what} {_short(value)} is not a valid id (1-128 letters, digits, '_', '.' or "
            "'-', not starting with '.' or '-'): check the name; an id like this in the "
            "storage means a foreign or tampered object"
        )
    assert isinstance(value, str)
    return value


def _valid_id(value: str) -> str:
    if _ID.fullmatch(value) is None:
        raise ValueError(
            f"{_short(value)} is not a valid id (1-128 letters, digits, '_', '.' or '-', not "
            "starting with '.' or '-')"
        )
    return value


SafeId = Annotated[str, AfterValidator(_valid_id)]
"""A string field that must be a valid id: checked when a manifest is parsed."""


def safe_join(base: Path, *ids: str) -> Path:
    """``base/<id>/...`` after checking every id, and that the result stays inside ``base``.

    Defence in depth where a path is built from an id read from storage: the manifest
    models already refuse bad ids, this refuses them again at the point of use.

    Raises:
        InvalidIdError: an id is not valid or the path would leave ``base``.
    """
    for value in ids:
        check_id(value, "path component")
    joined = base.joinpath(*ids)
    root = Path(os.path.abspath(base))
    full = Path(os.path.abspath(joined))
    if full == root or not full.is_relative_to(root):
        raise InvalidIdError(
            f"path {str(joined)!r} would leave {str(base)!r}: refusing to write there"
        )
    return joined


def _id_second(backup_id: str) -> str:
    """The start-time part of a backup id (``20261130T005750Z``), which sorts by time."""
    return backup_id.split("-", 1)[0]


def new_backup_id(now: datetime | None = None) -> str:
    """A sortable, unique backup id: ``20261121T101530Z-3fa9c2``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{moment:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------------------
# Models


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ManifestModel(_Frozen):
    """What every manifest model provides to the catalog (logical and physical)."""

    KIND: ClassVar[str] = ""

    @abstractmethod
    def location_ids(self) -> tuple[str, str]:
        """``(db_id, backup_id)`` as the manifest states them."""

    @abstractmethod
    def object_keys(self) -> list[str]:
        """Storage keys of the backup's objects."""

    @abstractmethod
    def order(self) -> tuple[datetime, str]:
        """Sort key: oldest first."""


class StoredObjectInfo(_Frozen):
    """One encrypted object of a backup."""

    key: str = Field(description="Key of the object in the storage.")
    raw_size: int = Field(description="Bytes before pgbackflow's compression and encryption.")
    stored_size: int = Field(description="Bytes stored.")
    sha256: str = Field(description="SHA-256 of the stored bytes, hex.")
    object_id: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{32}$",
        description="The archive header's random object id, hex: a reader refuses another "
        "archive before releasing any of its plaintext (the SHA-256 is known only at the end). "
        "None in manifests written before it was recorded.",
    )


class DatabaseInfo(_Frozen):
    """Identity of the backed-up database."""

    db_id: SafeId
    name: str
    host: str
    port: int
    system_identifier: str | None
    database_oid: int


class TableRows(_Frozen):
    """Exact rows of one table in the backup's snapshot."""

    schema_name: str = Field(alias="schema")
    table: str
    key: str
    rows: int

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class LogicalManifest(ManifestModel):
    """Everything known about one logical backup."""

    KIND: ClassVar[str] = "logical"

    manifest_version: Literal[1] = 1
    kind: Literal["logical"] = "logical"
    backup_id: SafeId
    database: DatabaseInfo
    server_version: str
    server_version_num: int
    pg_dump_version: str
    format: Literal["custom"] = "custom"
    compression: str = Field(description="Who compressed the dump and how, e.g. 'pg_dump zstd:5'.")
    started_at: datetime
    finished_at: datetime
    dump: StoredObjectInfo
    globals: StoredObjectInfo
    key_id: str
    snapshot: str
    tables: tuple[TableRows, ...]
    schema_count: int
    table_count: int
    database_size: int
    tool_version: str

    @property
    def server_major(self) -> int:
        """Major version of the source server."""
        return self.server_version_num // 10000

    @property
    def stored_size(self) -> int:
        """Bytes this backup occupies in one storage."""
        return self.dump.stored_size + self.globals.stored_size

    def rows_by_table(self) -> dict[str, int]:
        """``{schema.table: rows}`` as counted in the snapshot."""
        return {t.key: t.rows for t in self.tables}

    def location_ids(self) -> tuple[str, str]:
        """``(db_id, backup_id)``."""
        return self.database.db_id, self.backup_id

    def object_keys(self) -> list[str]:
        """The dump and the globals."""
        return [self.dump.key, self.globals.key]

    def order(self) -> tuple[datetime, str]:
        """Oldest first: by finish time, then id."""
        return self.finished_at, self.backup_id

    def to_json(self) -> bytes:
        """Serialised manifest without a MAC (what :func:`write_manifest` authenticates)."""
        return self.model_dump_json(indent=2, by_alias=True).encode() + b"\n"


# ---------------------------------------------------------------------------------------
# Authentication


class ManifestAuth(_Frozen):
    """The ``auth`` member of a stored manifest."""

    scheme: Literal["pgbackflow-manifest-mac-v1"]
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="Master key the MAC key is from.")
    mac: str = Field(pattern=r"^[0-9a-f]{64}$", description="HMAC-SHA256, hex.")


@dataclass(frozen=True)
class ManifestBinding:
    """Where a manifest is stored: what its MAC binds it to.

    Attributes:
        kind: "logical" or "physical".
        db_id: The database (logical) or cluster (physical) id.
        backup_id: The backup id.
        storage_key: The manifest's key relative to the storage root.
    """

    kind: str
    db_id: str
    backup_id: str
    storage_key: str


def canonical_json(value: object) -> bytes:
    """The bytes a manifest's MAC covers: sorted keys, no spaces, ASCII with \\u escapes.

    Raises:
        ValueError: the value holds NaN or infinities (never written by pgbackflow).
        RecursionError: nested too deeply.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return text.encode("ascii")


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return struct.pack(">I", len(data)) + data


def manifest_mac(master_key: MasterKey, binding: ManifestBinding, body: object) -> str:
    """HMAC-SHA256 (hex) of a manifest body at its location, under the manifest MAC key.

    The message is ``label || lp(kind) || lp(db_id) || lp(backup_id) || lp(storage_key)
    || lp(key_id) || canonical_json(body)`` with ``lp`` a 4-byte length prefix, so a body
    moved to another key, backup or database no longer verifies.
    """
    message = b"".join([
        _MAC_LABEL,
        *(_length_prefixed(part) for part in (
            binding.kind, binding.db_id, binding.backup_id, binding.storage_key,
            master_key.key_id_hex,
        )),
        canonical_json(body),
    ])
    return hmac.new(master_key.manifest_mac_key, message, hashlib.sha256).hexdigest()


def seal(body: Mapping[str, Any], binding: ManifestBinding, master_key: MasterKey) -> bytes:
    """The stored form of a manifest: its JSON body plus an ``auth`` member with the MAC."""
    if "auth" in body:
        raise ValueError("a manifest body must not have an 'auth' member")
    auth = ManifestAuth(
        scheme=MAC_SCHEME, key_id=master_key.key_id_hex,
        mac=manifest_mac(master_key, binding, body),
    )
    document = {**body, "auth": auth.model_dump()}
    return json.dumps(document, indent=2).encode("ascii") + b"\n"


@dataclass(frozen=True)
class OpenedManifest:
    """A stored manifest after its MAC was checked (or not, without a key).

    Attributes:
        body: The JSON object without ``auth`` (None when unreadable).
        status: See :data:`ManifestStatus`.
        auth_key_id: Key id named by ``auth``.
        refusal: Why it is refused ("failed"), or why it cannot be trusted ("no-mac").
    """

    body: dict[str, Any] | None
    status: ManifestStatus
    auth_key_id: str | None = None
    refusal: ManifestError | None = None


def open_manifest(
    raw: bytes, binding: ManifestBinding, keyring: Keyring | None, label: str
) -> OpenedManifest:
    """Parse a stored manifest and check its MAC with ``keyring`` (when given).

    Never raises for bad input: the result's ``refusal`` says what is wrong.

    Args:
        raw: The stored bytes.
        binding: Where it was read from (what the MAC must bind it to).
        keyring: Keys to verify with; None lists without verifying.
        label: ``<storage>/<key>``, for messages.
    """
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not JSON"
        return OpenedManifest(None, "failed", refusal=ManifestError(
            f"manifest {label} is unreadable ({reason}): it was damaged or replaced; "
            "restore it from another copy of the storage or remove it"
        ))
    if not isinstance(document, dict):
        return OpenedManifest(None, "failed", refusal=ManifestError(
            f"manifest {label} is unreadable (not a JSON object): it was damaged or replaced; "
            "restore it from another copy of the storage or remove it"
        ))
    raw_auth = document.pop("auth", None)
    if raw_auth is None:
        return OpenedManifest(document, "no-mac", refusal=ManifestAuthenticationError(
            f"manifest {label} has no MAC (written before pgbackflow authenticated manifests, "
            "or the MAC was removed), so it cannot be trusted: if you vouch for this "
            "storage, seal its old manifests once (docs/FORMAT.md, 'Manifests without a MAC')"
        ))
    try:
        auth = ManifestAuth.model_validate(raw_auth)
    except ValidationError:
        return OpenedManifest(document, "failed", refusal=ManifestAuthenticationError(
            f"manifest {label} failed authentication: its 'auth' member is malformed, so it "
            "was not written by pgbackflow or was modified"
        ))
    if keyring is None:
        return OpenedManifest(document, "unverified", auth.key_id)
    key = keyring.find_hex(auth.key_id)
    if key is None:
        given = ", ".join(keyring.key_ids_hex())
        return OpenedManifest(document, "failed", auth.key_id, ManifestKeyError(
            f"manifest {label}: wrong encryption key (the manifest is authenticated with key "
            f"id {auth.key_id}, given {given}): {WRONG_KEY_HINT}"
        ))
    try:
        expected = manifest_mac(key, binding, document)
    except (ValueError, RecursionError):
        expected = ""
    if not hmac.compare_digest(expected, auth.mac):
        return OpenedManifest(document, "failed", auth.key_id, ManifestAuthenticationError(
            f"manifest {label} failed authentication: it was not written by a holder of key "
            f"{auth.key_id}, or it was modified or moved: do not trust it; restore it from "
            "another copy of the storage or remove it"
        ))
    return OpenedManifest(document, "verified", auth.key_id)


# ---------------------------------------------------------------------------------------
# Reading manifests from a storage

M = TypeVar("M", bound=ManifestModel)
_EPOCH = datetime.fromtimestamp(0, UTC)


@dataclass(frozen=True)
class ManifestRecord(Generic[M]):
    """One manifest found in a storage, usable or not.

    Attributes:
        key: Its storage key.
        db_id: Database/cluster id from the key (None when the key holds an invalid id).
        backup_id: Backup id from the key (None when invalid).
        status: See :data:`ManifestStatus`.
        manifest: The parsed manifest (None when it could not be parsed).
        auth_key_id: Key id its MAC names.
        refusal: Why it is refused or not trusted.
    """

    key: str
    db_id: str | None
    backup_id: str | None
    status: ManifestStatus
    manifest: M | None = None
    auth_key_id: str | None = None
    refusal: ManifestError | InvalidIdError | None = None

    @property
    def problem(self) -> str | None:
        """The one-line reason it is refused, if it is."""
        return str(self.refusal) if self.refusal is not None else None

    def accepted(self, authenticated: bool) -> bool:
        """Usable: verified when a keyring was given; otherwise readable and well-placed."""
        if self.manifest is None:
            return False
        if authenticated:
            return self.status == "verified"
        return self.status in ("unverified", "no-mac")

    def error(self, suffix: str = "") -> PgBackflowError:
        """A fresh exception carrying the refusal (plus ``suffix``)."""
        refusal = self.refusal or ManifestError(f"manifest {self.key} cannot be used")
        return type(refusal)(str(refusal) + suffix)


def _validation_reason(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "document"
    text = f"{where}: {first.get('msg', 'invalid')}"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return (text[:200] + more).replace("\n", " ")


def read_manifest_record(
    storage: Storage,
    key: str,
    model: type[M],
    binding_of: Callable[[str, str], ManifestBinding],
    raw_ids: tuple[str, str],
    keyring: Keyring | None,
    *,
    size: int | None = None,
) -> ManifestRecord[M] | None:
    """Read, authenticate (with ``keyring``) and parse the manifest at ``key``.

    Args:
        storage: Where it is.
        key: Its storage key.
        model: The manifest model.
        binding_of: ``(db_id, backup_id) → binding`` for this kind of manifest.
        raw_ids: ``(db_id, backup_id)`` as they appear in ``key``.
        keyring: Keys to verify with; None lists without verifying.
        size: Its size from the listing, to refuse huge objects unread.

    Returns:
        The record, or None when the object vanished since it was listed.

    Raises:
        StorageError: the storage failed (transient errors are not turned into refusals).
    """
    label = f"{storage.location}/{key}"
    db_raw, backup_raw = raw_ids
    if not (is_valid_id(db_raw) and is_valid_id(backup_raw)):
        bad = db_raw if not is_valid_id(db_raw) else backup_raw
        return ManifestRecord(key, None, None, "failed", refusal=InvalidIdError(
            f"manifest {label}: its key holds {_short(bad)}, which is not a valid id: the "
            "storage holds a foreign or tampered object; remove it"
        ))
    binding = binding_of(db_raw, backup_raw)
    if binding.storage_key != key:
        return ManifestRecord(key, db_raw, backup_raw, "failed", refusal=ManifestError(
            f"manifest {label} is not where a manifest of backup {backup_raw} belongs "
            f"({binding.storage_key}): remove it"
        ))
    if size is not None and size > MAX_MANIFEST_BYTES:
        return ManifestRecord(key, db_raw, backup_raw, "failed", refusal=ManifestError(
            f"manifest {label} is {size} bytes, more than any manifest pgbackflow writes "
            f"({MAX_MANIFEST_BYTES}): it was replaced; remove it"
        ))
    try:
        raw = storage.read_bytes(key)
    except ObjectNotFoundError:
        return None
    opened = open_manifest(raw, binding, keyring, label)
    if opened.status == "failed" or opened.body is None:
        return ManifestRecord(key, db_raw, backup_raw, "failed", None, opened.auth_key_id,
                              opened.refusal)
    try:
        manifest = model.model_validate(opened.body)
    except ValidationError as exc:
        return ManifestRecord(key, db_raw, backup_raw, "failed", None, opened.auth_key_id,
                              ManifestError(
            f"manifest {label} is malformed ({_validation_reason(exc)}): it was damaged, or "
            "written by another pgbackflow version; use the version that wrote it"
        ))
    problem = _placement_problem(manifest, binding, label)
    if problem is not None:
        return ManifestRecord(key, db_raw, backup_raw, "failed", None, opened.auth_key_id,
                              ManifestError(problem))
    return ManifestRecord(key, db_raw, backup_raw, opened.status, manifest, opened.auth_key_id,
                          opened.refusal)


def _placement_problem(
    manifest: ManifestModel, binding: ManifestBinding, label: str
) -> str | None:
    """Why a parsed manifest does not belong where it is stored, or None."""
    if binding.kind != manifest.KIND:
        return f"manifest {label} is a {manifest.KIND} manifest stored as a {binding.kind} one"
    db_id, backup_id = manifest.location_ids()
    if (db_id, backup_id) != (binding.db_id, binding.backup_id):
        return (
            f"manifest {label} describes backup {backup_id} of {db_id} but is stored as "
            f"backup {binding.backup_id} of {binding.db_id}: it was moved or copied; remove it"
        )
    prefix = binding.storage_key.rsplit("/", 1)[0] + "/"
    for object_key in manifest.object_keys():
        if not object_key.startswith(prefix) or "/" in object_key[len(prefix):]:
            return (
                f"manifest {label} refers to object {_short(object_key)} outside its backup "
                f"({prefix}): it was tampered with; remove it"
            )
    return None


@dataclass(frozen=True)
class Catalog(Generic[M]):
    """The manifests of one kind in a storage, and which of them a reader may use.

    Attributes:
        records: Every manifest found, usable or not.
        authenticated: A keyring was given, so only verified manifests are usable.
    """

    records: tuple[ManifestRecord[M], ...]
    authenticated: bool

    def listed(self) -> list[M]:
        """The usable manifests, oldest first; each refused one is logged as one line."""
        for record in self.refused:
            logger.warning("%s (not listed)", record.problem)
        return self.accepted

    @property
    def accepted(self) -> list[M]:
        """Usable manifests, oldest first."""
        found = [r.manifest for r in self.records if r.accepted(self.authenticated)]
        usable = [m for m in found if m is not None]
        usable.sort(key=lambda m: m.order())
        return usable

    @property
    def refused(self) -> list[ManifestRecord[M]]:
        """Manifests that cannot be used (why: ``record.problem``)."""
        return [r for r in self.records if not r.accepted(self.authenticated)]

    def listing(self) -> list[ManifestRecord[M]]:
        """Every record: usable ones oldest first, then the refused ones by key."""
        usable = [r for r in self.records if r.accepted(self.authenticated)]
        usable.sort(key=lambda r: r.manifest.order() if r.manifest else (_EPOCH, ""))
        return usable + sorted(self.refused, key=lambda r: r.key)

    def refused_by_id(self) -> dict[str, str]:
        """``{backup_id: problem}`` of the refused manifests with a valid id."""
        return {r.backup_id: r.problem or "refused" for r in self.refused if r.backup_id}

    def db_ids(self) -> list[str]:
        """Database/cluster ids found (usable or not)."""
        return sorted({r.db_id for r in self.records if r.db_id})

    def newer_refused(self) -> list[ManifestRecord[M]]:
        """Refused manifests that may be newer than the newest usable one, newest last.

        Backup ids start with their start time to the second, so an id whose time is
        later than the newest usable backup's is a later backup. Ids of the same second
        cannot be ordered (the rest is random), so those count as newer too, as does a
        refused manifest without a valid id: it could be anything.
        """
        usable = self.accepted
        newest = _id_second(usable[-1].location_ids()[1]) if usable else None
        newer = [
            r for r in self.refused
            if newest is None or r.backup_id is None or _id_second(r.backup_id) >= newest
        ]
        newer.sort(key=lambda r: r.backup_id or "\U0010ffff")
        return newer

    def check_newest(self, what: str) -> None:
        """Refuse to pick the newest backup while a possibly newer manifest is refused.

        Otherwise an attacker who damages the newest manifest would silently get an older
        backup restored. Refused manifests older than the newest usable one are reported
        (one warning line each) and skipped.

        Raises:
            ManifestError: the newest manifest is refused (its problem, and what to do).
        """
        newer = self.newer_refused()
        usable = self.accepted
        if newer:
            worst = newer[-1]
            others = len(newer) - 1
            more = f" ({others} more refused)" if others else ""
            if usable:
                fallback = usable[-1].location_ids()[1]
                raise worst.error(
                    f"{more}; {what} is refused rather than falling back to the older backup "
                    f"{fallback}: name a backup id to use an older one"
                )
            raise worst.error(more)
        for record in self.refused:
            logger.warning("%s (skipped: older than the backup picked)", record.problem)

    def newest(self, what: str) -> M | None:
        """The newest usable manifest (see :meth:`check_newest`); None when there is none."""
        self.check_newest(what)
        usable = self.accepted
        return usable[-1] if usable else None

    def select(self, backup_id: str) -> M | None:
        """The usable manifest of ``backup_id``; None when there is no manifest for it.

        Raises:
            ManifestError: the backup's manifest is refused (the message says why).
        """
        matches = [r for r in self.records if r.backup_id == backup_id]
        for record in matches:
            if record.accepted(self.authenticated) and record.manifest is not None:
                return record.manifest
        if matches:
            raise matches[0].error()
        return None


# ---------------------------------------------------------------------------------------
# Logical backups


def backup_prefix(db_id: str, backup_id: str) -> str:
    """Storage key prefix of one backup (ids checked: they become key segments)."""
    check_id(db_id, "database id")
    check_id(backup_id, "backup id")
    return f"{LOGICAL_ROOT}/{db_id}/{backup_id}/"


def find_manifest_key(manifest: LogicalManifest) -> str:
    """Storage key of a manifest."""
    return backup_prefix(manifest.database.db_id, manifest.backup_id) + MANIFEST_NAME


def logical_binding(db_id: str, backup_id: str) -> ManifestBinding:
    """What a logical manifest's MAC binds it to."""
    return ManifestBinding(
        LogicalManifest.KIND, db_id, backup_id, backup_prefix(db_id, backup_id) + MANIFEST_NAME
    )


def signing_key(manifest_key_id: str, master_key: MasterKey, what: str) -> MasterKey:
    """The key a manifest is sealed with: the one that encrypted the backup's objects.

    Raises:
        ConfigError: ``master_key`` is not the key the manifest names.
    """
    if master_key.key_id_hex != manifest_key_id:
        raise ConfigError(
            f"cannot authenticate {what}: it names master key {manifest_key_id}, but key "
            f"{master_key.key_id_hex} was given: seal it with the key that encrypted the backup"
        )
    return master_key


def write_manifest(storage: Storage, manifest: LogicalManifest, master_key: MasterKey) -> None:
    """Publish the manifest, sealed with a MAC: the backup exists from this moment on.

    Args:
        storage: Where the backup's objects are.
        manifest: The manifest.
        master_key: Seals it: the key the backup was encrypted with (``manifest.key_id``).
    """
    db_id, backup_id = manifest.location_ids()
    binding = logical_binding(db_id, backup_id)
    key = signing_key(manifest.key_id, master_key, f"manifest {binding.storage_key}")
    data = seal(manifest.model_dump(mode="json", by_alias=True), binding, key)
    with storage.open_write(binding.storage_key, size_hint=len(data)) as writer:
        writer.write(data)


def scan_backups(
    storage: Storage, db_id: str | None = None, keyring: Keyring | None = None
) -> Catalog[LogicalManifest]:
    """Every logical manifest in ``storage`` (optionally of one database), checked: the
    logical view of the storage's catalog (:func:`pgbackflow.tasks.catalog.read_catalog`).

    Args:
        storage: Where to look.
        db_id: Only this database.
        keyring: Verify MACs with these keys; None: list without verifying.
    """
    from pgbackflow.tasks.catalog import read_catalog

    return read_catalog(storage, keyring, db_id=db_id, kinds=("logical",),
                        keep_manifests=True).manifests("logical")


def list_backups(
    storage: Storage, db_id: str | None = None, keyring: Keyring | None = None
) -> list[LogicalManifest]:
    """The usable backups in ``storage`` (optionally of one database), oldest first.

    With ``keyring`` only manifests whose MAC verifies; without, every readable one.
    Refused manifests are logged (one line each).
    """
    return scan_backups(storage, db_id, keyring).listed()


def find_backup(
    storage: Storage, backup_id: str, db_id: str | None, keyring: Keyring
) -> LogicalManifest:
    """The backup with ``backup_id``, or the newest one when it is ``latest``.

    Only manifests whose MAC verifies with ``keyring`` are considered. ``latest`` is
    refused while a manifest that may be newer than the newest verified one is refused:
    an older backup is never restored in its place without saying so.

    Raises:
        ObjectNotFoundError: no such backup (the message lists what exists).
        ManifestError: the requested (or the newest) backup's manifest is refused.
        ConfigError: ``latest`` is ambiguous because several databases are stored, or an
            id is malformed.
    """
    catalog = scan_backups(storage, db_id, keyring)
    if backup_id == "latest":
        databases = catalog.db_ids()
        if len(databases) > 1:
            raise ConfigError(
                f"{storage.location} holds backups of several databases ({', '.join(databases)}):"
                " name one with --db-id"
            )
        manifest = catalog.newest("picking 'latest'")
        if manifest is None:
            scope = f" of database {db_id}" if db_id else ""
            raise ObjectNotFoundError(
                f"no backups{scope} in {storage.location}: run pgbackflow backup first"
            )
        return manifest
    check_id(backup_id, "backup id")
    manifest = catalog.select(backup_id)
    if manifest is not None:
        return manifest
    newest = ", ".join(m.backup_id for m in catalog.accepted[-3:]) or "none"
    raise ObjectNotFoundError(
        f"backup '{backup_id}' not found in {storage.location} (newest: {newest}): "
        "run pgbackflow list to see the backups"
    )


# ---------------------------------------------------------------------------------------
# Old manifests


def seal_legacy_manifests(storage: Storage, master_key: MasterKey) -> list[str]:
    """Add a MAC to every manifest in ``storage`` that has none (trust on first use).

    Only for manifests written before pgbackflow authenticated them, and only after making
    sure nobody could have changed the storage: sealing vouches for what is there.
    Manifests that are malformed or stored in the wrong place are left alone.

    Returns:
        Keys of the manifests sealed.
    """
    from pgbackflow.tasks.physical import PHYSICAL_ROOT, PhysicalManifest, physical_binding

    kinds: list[tuple[str, type[ManifestModel], Callable[[str, str], ManifestBinding], int]] = [
        (LOGICAL_ROOT, LogicalManifest, logical_binding, 4),
        (PHYSICAL_ROOT, PhysicalManifest, physical_binding, 5),
    ]
    sealed: list[str] = []
    for root, model, binding_of, depth in kinds:
        for item in storage.list(f"{root}/"):
            parts = item.key.split("/")
            if len(parts) != depth or parts[-1] != MANIFEST_NAME:
                continue
            ids = (parts[1], parts[-2])
            record = read_manifest_record(
                storage, item.key, model, binding_of, ids, None, size=item.size
            )
            if record is None or record.status != "no-mac" or record.manifest is None:
                continue
            body = json.loads(storage.read_bytes(item.key))
            data = seal(body, binding_of(*ids), master_key)
            with storage.open_write(item.key, size_hint=len(data)) as writer:
                writer.write(data)
            sealed.append(item.key)
    return sealed


__all__ = [
    "MANIFEST_NAME",
    "Catalog",
    "DatabaseInfo",
    "InvalidIdError",
    "LogicalManifest",
    "ManifestAuth",
    "ManifestAuthenticationError",
    "ManifestBinding",
    "ManifestError",
    "ManifestKeyError",
    "ManifestModel",
    "ManifestRecord",
    "ManifestStatus",
    "ObjectNotFoundError",
    "OpenedManifest",
    "SafeId",
    "StoredObjectInfo",
    "TableRows",
    "backup_prefix",
    "canonical_json",
    "check_id",
    "find_backup",
    "find_manifest_key",
    "is_valid_id",
    "list_backups",
    "logical_binding",
    "manifest_mac",
    "new_backup_id",
    "open_manifest",
    "read_manifest_record",
    "safe_join",
    "scan_backups",
    "seal",
    "seal_legacy_manifests",
    "signing_key",
    "write_manifest",
]
