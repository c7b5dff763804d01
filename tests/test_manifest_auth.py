"""Manifest authentication, id checks and WAL name checks, against real storages.

No PostgreSQL here: manifests and WAL segments are written by the real writers into a
local folder and into S3 (moto), then tampered with the way someone with write access to
the storage (but not the master key) could. The fuzz tests feed the manifest reader
thousands of hostile documents and expect nothing but the project's one-line errors.
"""

from __future__ import annotations

import json
import secrets
import shutil
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pgbackflow.tasks.errors import PgBackflowError
from pgbackflow.tasks.keys import Keyring, MasterKey
from pgbackflow.tasks.manifest import (
    Catalog,
    DatabaseInfo,
    InvalidIdError,
    LogicalManifest,
    ManifestAuthenticationError,
    ManifestKeyError,
    ManifestRecord,
    StoredObjectInfo,
    TableRows,
    backup_prefix,
    check_id,
    find_backup,
    find_manifest_key,
    logical_binding,
    open_manifest,
    read_manifest_record,
    safe_join,
    scan_backups,
    seal,
    seal_legacy_manifests,
    write_manifest,
)
from pgbackflow.tasks.physical import (
    PhysicalManifest,
    manifest_key,
    physical_binding,
    scan_physical_backups,
)
from pgbackflow.tasks.physical import write_manifest as write_physical_manifest
from pgbackflow.tasks.pipeline import store_bytes
from pgbackflow.tasks.storage import LocalFolderStorage, S3ObjectStorage, Storage
from pgbackflow.tasks.wal import (
    SegmentPages,
    WalIntegrityError,
    fetch_wal_file,
    read_wal_inventory,
    wal_object_key,
    wal_prefix,
)
from tests.fixtures.s3 import S3Bucket

DB = "shop-3fa9c21b"
OLD = "20260101T000000Z-aaaaaa"
NEW = "20260102T000000Z-bbbbbb"
KEY = MasterKey.generate()
RING = Keyring([KEY])


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """An empty storage: a local folder or a fresh S3 bucket."""
    if request.param == "local":
        yield LocalFolderStorage(tmp_path / "store")
        return
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    yield S3ObjectStorage(bucket.bucket, "pg", endpoint_url=bucket.endpoint_url,
                          region=bucket.region)


def logical(backup_id: str, db_id: str = DB, rows: int = 5,
            finished: datetime | None = None) -> LogicalManifest:
    """A logical manifest whose objects lie in its own backup folder."""
    prefix = backup_prefix(db_id, backup_id)

    def info(name: str) -> StoredObjectInfo:
        return StoredObjectInfo(key=prefix + name, raw_size=rows, stored_size=rows,
                                sha256=secrets.token_hex(32))

    moment = finished or datetime.now(UTC)
    return LogicalManifest(
        backup_id=backup_id,
        database=DatabaseInfo(db_id=db_id, name="shop", host="db1", port=5432,
                              system_identifier="7312", database_oid=16384),
        server_version="17.6", server_version_num=170006, pg_dump_version="17.6",
        compression="pg_dump zstd:5", started_at=moment, finished_at=moment,
        dump=info("dump.pgbf"), globals=info("globals.pgbf"), key_id=KEY.key_id_hex,
        snapshot="00000003-00000002-1",
        tables=(TableRows(schema_name="public", table="t", key="public.t", rows=rows),),
        schema_count=1, table_count=1, database_size=8192, tool_version="pgbackflow test",
    )


def physical(backup_id: str, db_id: str = "cluster-7312", parent: str | None = None,
             full: str | None = None) -> PhysicalManifest:
    prefix = f"physical/{db_id}/base/{backup_id}/"
    info = StoredObjectInfo(key=prefix + "base.tar.pgbf", raw_size=1, stored_size=1,
                            sha256="0" * 64)
    manifest_info = info.model_copy(update={"key": prefix + "backup_manifest.pgbf"})
    now = datetime.now(UTC)
    return PhysicalManifest(
        backup_id=backup_id, db_id=db_id, mode="incremental" if parent else "full",
        parent_id=parent, full_id=full or backup_id, system_identifier="7312", timeline=1,
        start_lsn="0/2000028", end_lsn="0/2000100", wal_segment_size=16 * 1024 * 1024,
        source="u@h:5432", server_version="17.6", server_version_num=170006,
        pg_basebackup_version="17.6", started_at=now, finished_at=now, base=info,
        backup_manifest=manifest_info, key_id=KEY.key_id_hex, cluster_size=1,
        tool_version="pgbackflow test",
    )


def stored_json(storage: Storage, key: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(storage.read_bytes(key))
    return document


def put_json(storage: Storage, key: str, document: dict[str, Any]) -> None:
    storage.write_bytes(key, json.dumps(document, indent=2).encode())


# --------------------------------------------------------------------------- ids and paths


@pytest.mark.parametrize("bad", [
    "", ".", "..", "../x", "a/b", "-rf", ".hidden", "a\nb", "a b", "x" * 129, "é", "a\x00",
    "..\\..\\x", "/abs",
])
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidIdError, match="is not a valid id"):
        check_id(bad, "backup id")


@pytest.mark.parametrize("good", ["b", "cluster-7312", "shop_x-3fa9c21b", "_db-1", OLD,
                                  "a..b", "x" * 128])
def test_valid_ids_pass(good: str) -> None:
    assert check_id(good, "backup id") == good


def test_safe_join_stays_inside_its_base(tmp_path: Path) -> None:
    canary = tmp_path / "outside"
    base = tmp_path / "work" / "chain"
    assert safe_join(base, OLD) == base / OLD
    for bad in ("../outside", "../../outside", "..", "", "a/../../outside", str(canary)):
        with pytest.raises(InvalidIdError):
            safe_join(base, bad)
    assert not canary.exists()


def test_traversal_ids_in_a_manifest_fail_at_parse_time(storage: Storage) -> None:
    """Even with a valid MAC (a key holder's bug), a '../' id never becomes a model."""
    write_physical_manifest(storage, physical(OLD), KEY)
    key = manifest_key(physical(OLD))
    document = stored_json(storage, key)
    del document["auth"]
    for field in ("backup_id", "full_id", "parent_id", "db_id"):
        hostile = dict(document, **{field: "../../../../../../tmp/x/escaped"})
        storage.write_bytes(key, seal(hostile, physical_binding("cluster-7312", OLD), KEY))
        record = scan_physical_backups(storage, keyring=RING).records[0]
        assert record.status == "failed" and record.manifest is None
        assert f"{field}: Value error" in (record.problem or "")
        assert "is not a valid id" in (record.problem or "")
        assert "\n" not in (record.problem or "")


# --------------------------------------------------------------------------- the MAC


def test_written_manifests_verify_and_list_without_a_key(storage: Storage) -> None:
    write_manifest(storage, logical(OLD), KEY)
    write_manifest(storage, logical(NEW), KEY)
    verified = scan_backups(storage, keyring=RING)
    assert [(r.backup_id, r.status) for r in verified.records] == [
        (OLD, "verified"), (NEW, "verified")
    ]
    unverified = scan_backups(storage)
    assert {r.status for r in unverified.records} == {"unverified"}
    assert [m.backup_id for m in unverified.accepted] == [OLD, NEW]
    assert find_backup(storage, "latest", None, RING).backup_id == NEW
    document = stored_json(storage, find_manifest_key(logical(NEW)))
    assert document["auth"]["key_id"] == KEY.key_id_hex
    assert document["auth"]["scheme"] == "pgbackflow-manifest-mac-v1"


@pytest.mark.parametrize("change", ["rows", "sha256", "dump_key", "finished_at", "extra_table"])
def test_any_edit_fails_authentication(storage: Storage, change: str) -> None:
    write_manifest(storage, logical(OLD), KEY)
    write_manifest(storage, logical(NEW, rows=9), KEY)
    key = find_manifest_key(logical(NEW))
    document = stored_json(storage, key)
    if change == "rows":
        document["tables"][0]["rows"] = 5
    elif change == "sha256":
        document["dump"]["sha256"] = "0" * 64
    elif change == "dump_key":
        document["dump"]["key"] = backup_prefix(DB, OLD) + "dump.pgbf"
    elif change == "finished_at":
        document["finished_at"] = "2020-01-01T00:00:00Z"
    else:
        document["tables"].append(dict(document["tables"][0], table="u", key="public.u"))
    put_json(storage, key, document)
    with pytest.raises(ManifestAuthenticationError) as refused:
        find_backup(storage, "latest", None, RING)
    message = str(refused.value)
    assert f"{storage.location}/{key} failed authentication" in message
    assert f"not written by a holder of key {KEY.key_id_hex}" in message
    assert f"falling back to the older backup {OLD}" in message and "\n" not in message
    with pytest.raises(ManifestAuthenticationError, match="failed authentication"):
        find_backup(storage, NEW, None, RING)
    assert find_backup(storage, OLD, None, RING).backup_id == OLD


def test_a_refused_manifest_of_the_same_second_counts_as_newer(storage: Storage) -> None:
    # Two backups started in the same second: the random part of their ids says nothing
    # about which is newer (seen in CI: the newer one's id sorted first).
    earlier, later = "20260102T000000Z-ffffff", "20260102T000000Z-000000"
    write_manifest(storage, logical(earlier, finished=datetime(2026, 1, 2, 0, 0, 1, tzinfo=UTC)),
                   KEY)
    write_manifest(storage, logical(later, finished=datetime(2026, 1, 2, 0, 0, 2, tzinfo=UTC)),
                   KEY)
    assert find_backup(storage, "latest", None, RING).backup_id == later
    key = find_manifest_key(logical(later))
    put_json(storage, key, stored_json(storage, find_manifest_key(logical(earlier))))
    with pytest.raises(ManifestAuthenticationError, match=f"falling back to the older backup "
                       f"{earlier}"):
        find_backup(storage, "latest", None, RING)
    assert find_backup(storage, earlier, None, RING).backup_id == earlier


@pytest.mark.parametrize("where", ["newer_backup", "new_backup_id", "other_database"])
def test_a_valid_manifest_moved_elsewhere_is_refused(storage: Storage, where: str) -> None:
    write_manifest(storage, logical(OLD), KEY)
    write_manifest(storage, logical(NEW), KEY)
    source = stored_json(storage, find_manifest_key(logical(OLD)))
    target = {
        "newer_backup": find_manifest_key(logical(NEW)),
        "new_backup_id": find_manifest_key(logical("20270101T000000Z-cccccc")),
        "other_database": find_manifest_key(logical(OLD, db_id="other-11111111")),
    }[where]
    put_json(storage, target, source)
    backup_id, db_id = target.split("/")[2], target.split("/")[1]
    with pytest.raises(ManifestAuthenticationError, match="failed authentication") as refused:
        find_backup(storage, backup_id, db_id, RING)
    assert target in str(refused.value)
    with pytest.raises(ManifestAuthenticationError, match="failed authentication"):
        find_backup(storage, "latest", db_id, RING)
    # Without a key the body's ids give the move away.
    record = next(r for r in scan_backups(storage, db_id).records if r.key == target)
    assert record.status == "failed" and "moved or copied" in (record.problem or "")


def test_a_manifest_under_another_master_key_names_that_key(storage: Storage) -> None:
    attacker = MasterKey.generate()
    write_manifest(storage, logical(OLD), KEY)
    forged = logical(NEW, rows=0).model_copy(update={"key_id": attacker.key_id_hex})
    write_manifest(storage, forged, attacker)
    with pytest.raises(ManifestKeyError) as refused:
        find_backup(storage, "latest", None, RING)
    message = str(refused.value)
    assert "wrong encryption key" in message
    assert attacker.key_id_hex in message and KEY.key_id_hex in message
    # With both keys in the keyring (a rotation) it verifies: keys are picked by key id.
    assert find_backup(storage, "latest", None, Keyring([KEY, attacker])).backup_id == NEW


def test_stripped_mac_is_refused_until_sealed(storage: Storage) -> None:
    write_manifest(storage, logical(OLD), KEY)
    key = find_manifest_key(logical(OLD))
    document = stored_json(storage, key)
    del document["auth"]
    put_json(storage, key, document)
    assert [r.status for r in scan_backups(storage).records] == ["no-mac"]
    with pytest.raises(ManifestAuthenticationError, match="has no MAC"):
        find_backup(storage, "latest", None, RING)
    assert seal_legacy_manifests(storage, KEY) == [key]
    assert find_backup(storage, "latest", None, RING).backup_id == OLD


def test_unreadable_newest_manifest_blocks_latest(storage: Storage) -> None:
    write_manifest(storage, logical(OLD), KEY)
    storage.write_bytes(find_manifest_key(logical(NEW)), b"\x00not json")
    with pytest.raises(PgBackflowError, match=rf"{NEW}/manifest.json is unreadable"):
        find_backup(storage, "latest", None, RING)
    # An older broken manifest does not hide the newest good one.
    storage.delete(find_manifest_key(logical(NEW)))
    storage.write_bytes(find_manifest_key(logical("20251231T000000Z-000000")), b"[]")
    assert find_backup(storage, "latest", None, RING).backup_id == OLD


def test_manifest_under_a_key_with_a_bad_id_blocks_latest(
    s3_bucket: S3Bucket,
) -> None:
    """S3 keys may hold anything: such a manifest is refused unread and names the key."""
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    write_manifest(storage, logical(OLD), KEY)
    s3_bucket.client().put_object(Bucket=s3_bucket.bucket,
                                  Key=f"pg/logical/{DB}/bad id!/manifest.json", Body=b"{}")
    records = scan_backups(storage, DB, RING).records
    refused = [r for r in records if r.status == "failed"]
    assert len(refused) == 1 and "'bad id!', which is not a valid id" in (refused[0].problem or "")
    with pytest.raises(InvalidIdError, match="bad id!"):
        find_backup(storage, "latest", DB, RING)


def test_parent_loop_and_refused_parent_stop_the_chain() -> None:
    from pgbackflow.tasks.physical import chain_of

    full, inc = physical(OLD), physical(NEW, parent=OLD, full=OLD)
    with pytest.raises(ManifestAuthenticationError, match=f"parent {OLD}, whose manifest"):
        chain_of(inc, [inc], {OLD: "manifest x failed authentication"})
    looping = physical(NEW, parent=NEW, full=OLD)
    with pytest.raises(ManifestAuthenticationError, match="loop"):
        chain_of(looping, [full, looping])
    assert chain_of(inc, [full, inc]) == [full, inc]


# --------------------------------------------------------------------------- WAL

SEGMENT_SIZE = 1024 * 1024
SYSID = "7312345678901234567"
CLUSTER = "cluster-" + SYSID


def segment(number: int, timeline: int = 1) -> bytes:
    """A synthetic, finished WAL segment: a long page header, zeros, and a header on the last
    page (without it, it looks like a zero-padded .partial and is refused)."""
    header = struct.pack("<HHIQII", 0xD116, 0x0002, timeline, number * SEGMENT_SIZE, 0, 0)
    header += struct.pack("<QII", int(SYSID), SEGMENT_SIZE, 8192)
    data = bytearray(header + bytes(SEGMENT_SIZE - len(header)))
    last = SEGMENT_SIZE - 8192
    struct.pack_into("<HHIQ", data, last, 0xD116, 0, timeline, number * SEGMENT_SIZE + last)
    return bytes(data)


def store_wal(storage: Storage, name: str, data: bytes) -> None:
    store_bytes(data, [storage], wal_object_key(CLUSTER, name), KEY)


def fetch(storage: Storage, name: str, into: Path) -> str | None:
    return fetch_wal_file(storage, CLUSTER, name, into / name, RING,
                          segment_size=SEGMENT_SIZE, system_identifier=SYSID)


def test_a_segment_under_another_name_is_caught(storage: Storage, tmp_path: Path) -> None:
    store_wal(storage, "000000010000000000000002", segment(2))
    assert fetch(storage, "000000010000000000000002", tmp_path) is not None
    # The genuine, authenticated segment 2 stored as segment 3.
    store_wal(storage, "000000010000000000000003", segment(2))
    with pytest.raises(WalIntegrityError, match=r"000000010000000000000003\.pgbf: holds WAL "
                       "of another position"):
        fetch(storage, "000000010000000000000003", tmp_path)
    # Timeline 2's segment 4 stored as timeline 1's.
    store_wal(storage, "000000010000000000000004", segment(4, timeline=2))
    with pytest.raises(WalIntegrityError, match="holds WAL of timeline 2 under a timeline 1"):
        fetch(storage, "000000010000000000000004", tmp_path)
    assert not (tmp_path / "000000010000000000000003").exists()
    assert not (tmp_path / "000000010000000000000004").exists()


PAGE = 8192


def paged_segment(number: int, timelines: list[int]) -> bytes:
    """A synthetic segment whose page ``i`` carries timeline ``timelines[i]`` (0: a zero
    page), each at its own address; the first page with the long header."""
    assert len(timelines) == SEGMENT_SIZE // PAGE
    data = bytearray(SEGMENT_SIZE)
    for index, timeline in enumerate(timelines):
        if timeline:
            struct.pack_into("<HHIQ", data, index * PAGE, 0xD116, 0x0002 if index == 0 else 0,
                             timeline, number * SEGMENT_SIZE + index * PAGE)
    struct.pack_into("<QII", data, 24, int(SYSID), SEGMENT_SIZE, PAGE)
    return bytes(data)


def check_pages(data: bytes, name: str, begin: int | None, chunk: int) -> None:
    pages = SegmentPages(name, SEGMENT_SIZE, SYSID, begin, "test")
    for at in range(0, len(data), chunk):
        pages.feed(data[at:at + chunk])
    pages.finish()


@pytest.mark.parametrize("chunk", [5, 16, 17, 8191, 8200, SEGMENT_SIZE])
def test_pages_of_an_older_timeline_where_a_newer_one_began_are_caught(chunk: int) -> None:
    """A genuine timeline-1 segment stored under timeline 2's name of the same position:
    replay stopped at it as at the end of the WAL and promoted (a silent cut). Only up to
    the page where timeline 2 began may pages of timeline 1 come first."""
    pages = SEGMENT_SIZE // PAGE
    name = "000000020000000000000005"
    begin = 5 * SEGMENT_SIZE + 3 * PAGE + 100  # timeline 2 began inside page 3 of it
    forked = [1, 1, 1, 1] + [2] * (pages - 4)
    check_pages(paged_segment(5, forked), name, begin, chunk)
    check_pages(paged_segment(5, forked[:9] + [0] * (pages - 9)), name, begin, chunk)
    # A timeline-1 page after the switch: the first of a segment wholly after it, or later.
    for timelines, at in (([1] * pages, 4), ([*forked[:10], 1, *forked[11:]], 10)):
        with pytest.raises(WalIntegrityError, match=(
            f"page at LSN 0/{5 * SEGMENT_SIZE + at * PAGE:X} holds WAL of timeline 1, not of "
            "timeline 2, which began at LSN 0/")):
            check_pages(paged_segment(5, timelines), name, begin, chunk)
    with pytest.raises(WalIntegrityError, match="page at LSN 0/600000 holds WAL of timeline 1"):
        check_pages(paged_segment(6, [1] * pages), "000000020000000000000006", begin, chunk)
    # Timeline 2's pages before it began.
    with pytest.raises(WalIntegrityError, match="before that timeline began"):
        check_pages(paged_segment(5, [1, 2, *forked[2:]]), name, begin, chunk)
    # A page of a newer timeline than the name's, anywhere.
    with pytest.raises(WalIntegrityError, match="holds WAL of timeline 3, not of timeline 2"):
        check_pages(paged_segment(5, [*forked[:50], 3, *forked[51:]]), name, begin, chunk)
    # Where the timeline began is not known (no key, no history): only newer ones refused.
    check_pages(paged_segment(6, [1] * pages), "000000020000000000000006", None, chunk)


def test_history_files_must_name_older_timelines(storage: Storage, tmp_path: Path) -> None:
    store_wal(storage, "00000002.history", b"1\t0/3000000\tno recovery target specified\n")
    assert fetch(storage, "00000002.history", tmp_path) is not None
    # Timeline 3's history stored as timeline 2's.
    store_wal(storage, "00000002.history",
              b"1\t0/3000000\tno recovery target specified\n2\t0/5000000\tbefore x\n")
    with pytest.raises(WalIntegrityError, match="line 2 is not a history entry"):
        fetch(storage, "00000002.history", tmp_path)


def test_wal_names_from_storage_must_match_exactly(storage: Storage, tmp_path: Path) -> None:
    store_wal(storage, "000000010000000000000002", segment(2))
    # Names that only look like segments (a trailing newline: a regex '$' would accept it;
    # lower-case hex) must not count for gap detection. S3 (moto) cannot store the newline.
    storage.write_bytes(wal_prefix(CLUSTER) + "00000001000000000000000a.pgbf", b"junk")
    if isinstance(storage, LocalFolderStorage):  # planted: pgbackflow writes no such key
        planted = storage.folder / (wal_prefix(CLUSTER) + "000000010000000000000003\n.pgbf")
        planted.write_bytes(b"junk")
    inventory = read_wal_inventory(storage, CLUSTER, SEGMENT_SIZE)
    assert inventory.complete == {1: {2}}
    for bad in ("../../x", "000000010000000000000002/../../x", "00000002.history\n"):
        with pytest.raises(InvalidIdError):
            fetch_wal_file(storage, CLUSTER, bad, tmp_path / "x", RING)
    with pytest.raises(InvalidIdError):
        wal_prefix("../cluster")


# --------------------------------------------------------------------------- fuzz

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20,
)
_HOSTILE_TEXT = st.sampled_from([
    "../../../../../../tmp/x/escaped", "..", "", "a/b", "-x", "x\ny", "\x00", "é" * 3,
    "x" * 200, OLD, NEW, "logical/" + DB + "/" + OLD + "/dump.pgbf", "/etc/passwd",
])


def _fuzz_storage(tmp_path_factory: pytest.TempPathFactory) -> LocalFolderStorage:
    return LocalFolderStorage(tmp_path_factory.mktemp("fuzz") / "store")


def _check_clean(record: ManifestRecord[Any] | None, storage: Storage, key: str) -> None:
    """A record is either refused with a one-line project error, or fully well-formed."""
    assert record is not None
    if record.accepted(True) or record.accepted(False):
        manifest = record.manifest
        assert manifest is not None
        db_id, backup_id = manifest.location_ids()
        assert (db_id, backup_id) == (record.db_id, record.backup_id)
        check_id(db_id, "db")
        check_id(backup_id, "backup")
        folder = key.rsplit("/", 1)[0] + "/"
        assert all(k.startswith(folder) and "/" not in k[len(folder):]
                   for k in manifest.object_keys())
        return
    error = record.error()
    assert isinstance(error, PgBackflowError)
    assert "\n" not in str(error) and len(str(error)) < 2000


def _read(storage: Storage, key: str, keyring: Keyring | None) -> ManifestRecord[Any] | None:
    parts = key.split("/")
    return read_manifest_record(storage, key, LogicalManifest, logical_binding,
                                (parts[1], parts[2]), keyring)


def _mutate(document: Any, path: list[str | int], value: Any) -> Any:
    """``document`` with the member at ``path`` (clipped to what exists) replaced."""
    if not path or not isinstance(document, (dict, list)) or not document:
        return value
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        name = head if isinstance(head, str) and head in document else sorted(document)[
            sum(map(ord, str(head))) % len(document)]
        return {**document, name: _mutate(document[name], rest, value)}
    index = head if isinstance(head, int) else 0
    index %= len(document)
    return [*document[:index], _mutate(document[index], rest, value), *document[index + 1:]]


_FIELDS = st.sampled_from([
    "backup_id", "database", "db_id", "dump", "globals", "key", "sha256", "tables", "rows",
    "schema", "finished_at", "key_id", "manifest_version", "kind", "format",
])
_FUZZ = settings(max_examples=1500, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@_FUZZ
@given(raw=st.binary(max_size=300) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_arbitrary_bytes_and_json(tmp_path_factory: pytest.TempPathFactory,
                                       raw: bytes) -> None:
    storage = _fuzz_storage(tmp_path_factory)
    key = find_manifest_key(logical(OLD))
    storage.write_bytes(key, raw)
    for keyring in (RING, None):
        _check_clean(_read(storage, key, keyring), storage, key)
    shutil.rmtree(storage.folder)


@_FUZZ
@given(path=st.lists(_FIELDS | st.text(max_size=12) | st.integers(0, 5), min_size=1,
                     max_size=4),
       value=_JSON | _HOSTILE_TEXT, reseal=st.booleans(), drop=st.booleans())
def test_fuzz_mutated_manifests(tmp_path_factory: pytest.TempPathFactory,
                                path: list[str | int], value: Any, reseal: bool,
                                drop: bool) -> None:
    """Mutations of a real manifest; resealed ones get past the MAC into the model."""
    storage = _fuzz_storage(tmp_path_factory)
    write_manifest(storage, logical(OLD), KEY)
    key = find_manifest_key(logical(OLD))
    document = stored_json(storage, key)
    auth = document.pop("auth")
    mutated = _mutate(document, path, value)
    if drop and isinstance(mutated, dict) and mutated:
        mutated = {k: v for k, v in mutated.items() if k != sorted(mutated)[0]}
    if reseal and isinstance(mutated, dict) and "auth" not in mutated:
        try:
            data = seal(mutated, logical_binding(DB, OLD), KEY)
        except ValueError:  # NaN: not JSON, nothing pgbackflow could have written
            data = json.dumps(mutated).encode()
    else:
        data = json.dumps(mutated if not isinstance(mutated, dict) else {**mutated,
                                                                        "auth": auth}).encode()
    storage.write_bytes(key, data)
    record = _read(storage, key, RING)
    event(f"status {record.status if record else None}")
    _check_clean(record, storage, key)
    _check_clean(_read(storage, key, None), storage, key)
    if record is not None and record.status == "verified":
        assert reseal or mutated == document  # nothing unsealed verifies unless unchanged
    shutil.rmtree(storage.folder)


@_FUZZ
@given(raw=st.binary(max_size=200), auth=_JSON)
def test_fuzz_open_manifest_never_raises(raw: bytes, auth: Any) -> None:
    binding = logical_binding(DB, OLD)
    for data in (raw, json.dumps({"auth": auth, "x": 1}).encode()):
        for keyring in (RING, None):
            opened = open_manifest(data, binding, keyring, "fuzz")
            if opened.refusal is not None:
                assert isinstance(opened.refusal, PgBackflowError)
                assert "\n" not in str(opened.refusal)
            assert opened.status != "verified"


def test_catalog_orders_and_refuses_in_memory() -> None:
    """Newest-pick rules on plain records: an older refused manifest is skipped."""
    older_bad: ManifestRecord[LogicalManifest] = ManifestRecord(
        "k0", DB, "20251231T000000Z-000000", "failed",
        refusal=ManifestAuthenticationError("manifest k0 failed authentication"))
    good = ManifestRecord("k1", DB, OLD, "verified", logical(OLD))
    catalog = Catalog((older_bad, good), authenticated=True)
    assert catalog.newest("picking 'latest'") is good.manifest
    newer_bad = ManifestRecord("k2", DB, NEW, "no-mac", logical(NEW),
                               refusal=ManifestAuthenticationError("manifest k2 has no MAC"))
    with pytest.raises(ManifestAuthenticationError, match=f"k2 has no MAC; picking 'latest' is "
                       f"refused rather than falling back to the older backup {OLD}"):
        Catalog((older_bad, good, newer_bad), authenticated=True).newest("picking 'latest'")
    # Without a key a no-MAC manifest is listed (it is readable), the unreadable is not.
    assert [m.backup_id for m in Catalog((older_bad, newer_bad), False).accepted] == [NEW]


def test_cli_seals_legacy_manifests_after_confirmation(tmp_path: Path) -> None:
    """``pgbackflow key seal-manifests``: refused without a yes, then seals what has no MAC."""
    import subprocess
    import sys

    from pgbackflow.tasks.keys import write_key_file
    from pgbackflow.tasks.storage import LocalFolderStorage

    folder = tmp_path / "backups"
    folder.mkdir()
    storage = LocalFolderStorage(folder)
    write_manifest(storage, logical(OLD), KEY)
    key = find_manifest_key(logical(OLD))
    document = stored_json(storage, key)
    del document["auth"]
    put_json(storage, key, document)
    key_file = tmp_path / "master.key"
    write_key_file(key_file, KEY)
    cli = [str(Path(sys.executable).with_name("pgbackflow")), "key", "seal-manifests",
           "--from", str(folder), "--key-file", str(key_file)]
    refused = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "nothing sealed" in refused.stderr
    assert [r.status for r in scan_backups(storage).records] == ["no-mac"]
    done = subprocess.run([*cli, "--yes"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert f"sealed {key}" in done.stdout and "1 manifests sealed" in done.stdout
    assert find_backup(storage, "latest", None, RING).backup_id == OLD
