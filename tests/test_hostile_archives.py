"""Hostile archives: tar members that try to write outside the restore's target.

Every tar pgbackflow reads is unpacked by tasks/tarstream.py: regular files and directories
only, created fresh below the target, ``pg_tblspc/<oid>`` links re-pointed to the restore's
own tablespace folders. Each case puts canary files outside the target and checks they are
byte for byte, mode and owner unchanged, and that nothing new appeared next to them.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgbackflow.tasks.keys import Keyring, MasterKey, write_key_file
from pgbackflow.tasks.physical import (
    BACKUP_MANIFEST_NAME,
    BASE_NAME,
    PhysicalManifest,
    TablespaceObject,
    backup_prefix,
    physical_db_id,
    write_manifest,
)
from pgbackflow.tasks.pipeline import store_bytes
from pgbackflow.tasks.pitr import tablespace_root, unpack_backup
from pgbackflow.tasks.storage import LocalFolderStorage
from pgbackflow.tasks.tarstream import UnsafeArchiveError, unpack_tar_file, unpack_tar_stream
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it

CLI = [str(PGBACKFLOW)]
LABEL = "store/physical/cluster-1/base/b1/base.tar.pgbf"


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Member:
    """A tar member to craft."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o600


def tar_of(*members: Member) -> bytes:
    """A tar (GNU format, as pg_basebackup's is close to) holding ``members`` in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.mode = member.mode
            info.linkname = member.linkname
            info.mtime = 1_700_000_000
            if member.kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            info.size = len(member.data) if member.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(member.data) if info.size else None)
    return buffer.getvalue()


def snapshot(folder: Path) -> dict[str, tuple[bytes | str, int, int, int, float]]:
    """Every entry below ``folder``: content (or link target), mode, owner, size, mtime."""
    found: dict[str, tuple[bytes | str, int, int, int, float]] = {}
    for path in sorted([folder, *folder.rglob("*")]):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content: bytes | str = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        else:
            content = "dir"
        found[str(path.relative_to(folder))] = (
            content, info.st_mode, info.st_uid, info.st_size, info.st_mtime,
        )
    return found


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """Canary files next to the target; the test's end checks they were not touched."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "canary.txt").write_text("precious\n")
    (folder / "canary.txt").chmod(0o640)
    (folder / "postgresql.conf").write_text("shared_buffers = 1GB\n")
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before, "something outside the target was written"


def unpack(data: bytes, target: Path, links: dict[str, Path] | None = None) -> int:
    target.mkdir(exist_ok=True)
    # Several chunks, split mid-member: the unpacker reads a stream, not a file.
    chunks = [data[i:i + 700] for i in range(0, len(data), 700)]
    return unpack_tar_stream(chunks, target, label=LABEL, tablespace_links=links)


def refused_line(error: pytest.ExceptionInfo[UnsafeArchiveError], member: str) -> str:
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(f"{LABEL}: member {member!r} refused"), text
    return text


# --------------------------------------------------------------------------- unit: the unpacker


def hostile_cases(outside: Path) -> dict[str, tuple[list[Member], str, str]]:
    """name → (members, the member refused, what the message says about it)."""
    canary = str(outside / "canary.txt")
    return {
        "symlink then write through it": (
            [Member("PG_VERSION", data=b"17\n"),
             Member("postgresql.auto.conf", tarfile.SYMTYPE, linkname=canary),
             Member("postgresql.auto.conf", data=b"restore_command = 'evil'\n")],
            "postgresql.auto.conf", "a symbolic link to",
        ),
        "relative symlink out": (
            [Member("global", tarfile.DIRTYPE, mode=0o700),
             Member("global/pg_control", tarfile.SYMTYPE, linkname="../../outside/canary.txt")],
            "global/pg_control", "a symbolic link to",
        ),
        "hard link to an absolute path": (
            [Member("PG_VERSION", tarfile.LNKTYPE, linkname=canary),
             Member("PG_VERSION", data=b"pwned\n")],
            "PG_VERSION", "a hard link to",
        ),
        "hard link out by ..": (
            [Member("pg_hba.conf", tarfile.LNKTYPE, linkname="../outside/canary.txt")],
            "pg_hba.conf", "a hard link to",
        ),
        "hard link inside": (
            [Member("a", data=b"x"), Member("b", tarfile.LNKTYPE, linkname="a")],
            "b", "a hard link to",
        ),
        "symlinked directory then a file in it": (
            [Member("pg_wal", tarfile.SYMTYPE, linkname=str(outside)),
             Member("pg_wal/000000010000000000000001", data=b"wal")],
            "pg_wal", "a symbolic link to",
        ),
        "absolute path": (
            [Member(str(outside / "new.txt"), data=b"x")], str(outside / "new.txt"),
            "absolute path",
        ),
        "dot-dot path": ([Member("../outside/new.txt", data=b"x")], "../outside/new.txt",
                         "'..'"),
        "dot-dot inside a path": (
            [Member("base/../../outside/new.txt", data=b"x")], "base/../../outside/new.txt",
            "'..'",
        ),
        "character device": ([Member("null", tarfile.CHRTYPE)], "null", "a character device"),
        "fifo": ([Member("pipe", tarfile.FIFOTYPE)], "pipe", "a FIFO"),
        "tablespace link the backup does not have": (
            [Member("pg_tblspc", tarfile.DIRTYPE, mode=0o700),
             Member("pg_tblspc/99999", tarfile.SYMTYPE, linkname=str(outside))],
            "pg_tblspc/99999", "a symbolic link to",
        ),
        "a name written twice": (
            [Member("postgresql.conf", data=b"a = 1\n"),
             Member("postgresql.conf", data=b"b = 2\n")],
            "postgresql.conf", "already exists in the target",
        ),
        "a file where a directory goes": (
            [Member("global", data=b"x"), Member("global/pg_control", data=b"y")],
            "global/pg_control", "is a link or a file, not a directory",
        ),
    }


CASES = list(hostile_cases(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_hostile_member_is_refused(case: str, tmp_path: Path, outside: Path) -> None:
    members, refused, why = hostile_cases(outside)[case]
    with pytest.raises(UnsafeArchiveError) as error:
        unpack(tar_of(*members), tmp_path / "target", links={"16385": tmp_path / "ts"})
    assert why in refused_line(error, refused)
    assert not (tmp_path / "ts").exists()


def test_existing_link_in_the_target_is_never_followed(tmp_path: Path, outside: Path) -> None:
    """A link already in the target (put there by anyone) is not written through."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "pg_wal").symlink_to(outside)
    (target / "PG_VERSION").symlink_to(outside / "canary.txt")
    with pytest.raises(UnsafeArchiveError) as error:
        unpack(tar_of(Member("pg_wal", tarfile.DIRTYPE, mode=0o700),
                      Member("pg_wal/000000010000000000000001", data=b"wal")), target)
    assert "'pg_wal' in the target is a link or a file" in refused_line(error, "pg_wal")
    with pytest.raises(UnsafeArchiveError) as error:
        unpack(tar_of(Member("PG_VERSION", data=b"17\n")), target)
    assert "already exists in the target" in refused_line(error, "PG_VERSION")


def test_a_regular_tree_is_unpacked_with_its_modes(tmp_path: Path, outside: Path) -> None:
    target = tmp_path / "target"
    count = unpack(tar_of(
        Member("PG_VERSION", data=b"17\n"),
        Member("base", tarfile.DIRTYPE, mode=0o750),
        Member("base/1", tarfile.DIRTYPE, mode=0o700),
        Member("base/1/1259", data=os.urandom(20_000), mode=0o640),
        Member("global/pg_control", data=b"c" * 8192, mode=0o4755),  # parent not listed
        Member("./postgresql.conf", data=b"port = 5432\n"),
        Member(".", tarfile.DIRTYPE, mode=0o755),
    ), target)
    assert count == 7
    assert (target / "PG_VERSION").read_bytes() == b"17\n"
    assert stat.S_IMODE((target / "base").stat().st_mode) == 0o750
    assert stat.S_IMODE((target / "base/1/1259").stat().st_mode) == 0o640
    assert (target / "base/1/1259").stat().st_size == 20_000
    # No setuid from an archive; the data directory itself stays private.
    assert stat.S_IMODE((target / "global/pg_control").stat().st_mode) == 0o755
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert (target / "postgresql.conf").read_bytes() == b"port = 5432\n"
    assert not any(p.is_symlink() for p in target.rglob("*"))


def test_tablespace_links_point_to_the_restore_not_the_source(
    tmp_path: Path, outside: Path
) -> None:
    """pg_tblspc/<oid> links are written, but to where the restore puts the tablespace."""
    target, ours = tmp_path / "target", tmp_path / "target.tablespaces" / "16385"
    unpack(tar_of(Member("pg_tblspc", tarfile.DIRTYPE, mode=0o700),
                  Member("pg_tblspc/16385", tarfile.SYMTYPE, linkname=str(outside))),
           target, links={"16385": ours})
    link = target / "pg_tblspc" / "16385"
    assert link.is_symlink() and os.readlink(link) == str(ours)


def test_tool_archives_may_link_to_siblings_only(tmp_path: Path, outside: Path) -> None:
    """A toolset's tar: ``libpq.so.5 -> libpq.so.5.17`` is fine, a link out is not."""
    good = tar_of(Member("lib", tarfile.DIRTYPE, mode=0o755),
                  Member("lib/libpq.so.5.17", data=b"\x7fELF", mode=0o755),
                  Member("lib/libpq.so.5", tarfile.SYMTYPE, linkname="libpq.so.5.17"))
    target = tmp_path / "toolset"
    target.mkdir()
    assert unpack_tar_file(io.BytesIO(good), target, label="wheel") == 3
    assert os.readlink(target / "lib/libpq.so.5") == "libpq.so.5.17"
    for linkname in ("../../outside/canary.txt", str(outside / "canary.txt"), ".."):
        bad = tar_of(Member("lib", tarfile.DIRTYPE, mode=0o755),
                     Member("lib/libz.so", tarfile.SYMTYPE, linkname=linkname))
        fresh = tmp_path / f"toolset-{abs(hash(linkname))}"
        fresh.mkdir()
        with pytest.raises(UnsafeArchiveError, match=r"^wheel: member 'lib/libz.so' refused"):
            unpack_tar_file(io.BytesIO(bad), fresh, label="wheel")


# --------------------------------------------------------------------------- stored backups

SYSTEM_IDENTIFIER = "7400000000000000001"


def crafted_backup(
    storage: LocalFolderStorage, key: MasterKey, base_tar: bytes,
    tablespaces: dict[int, bytes] | None = None,
) -> PhysicalManifest:
    """A full backup whose data directory tar is ``base_tar``, stored and sealed like ours."""
    db_id = physical_db_id(SYSTEM_IDENTIFIER)
    backup_id = "20261121T101530Z-crafted"
    prefix = backup_prefix(db_id, backup_id)
    base = store_bytes(base_tar, [storage], prefix + BASE_NAME, key).info
    extra = tuple(
        TablespaceObject(
            oid=oid, location=f"/srv/source-tablespace-{oid}",
            object=store_bytes(data, [storage], f"{prefix}tablespace-{oid}.tar.pgbf", key).info,
        )
        for oid, data in (tablespaces or {}).items()
    )
    now = datetime.now(UTC)
    manifest = PhysicalManifest(
        backup_id=backup_id, db_id=db_id, mode="full", parent_id=None, full_id=backup_id,
        system_identifier=SYSTEM_IDENTIFIER, timeline=1, start_lsn="0/2000028",
        end_lsn="0/2000100", wal_segment_size=16 * 1024 * 1024, source="u@h:5432",
        server_version="17.6", server_version_num=170006, pg_basebackup_version="17.6",
        started_at=now, finished_at=now, base=base,
        backup_manifest=store_bytes(b"{}", [storage], prefix + BACKUP_MANIFEST_NAME, key).info,
        tablespaces=extra, key_id=key.key_id_hex, cluster_size=len(base_tar),
        tool_version="test",
    )
    write_manifest(storage, manifest, key)
    return manifest


def test_backup_with_a_tablespace_is_unpacked_into_the_restore(
    tmp_path: Path, outside: Path
) -> None:
    """The stored base tar's pg_tblspc link names the source's path: it is re-pointed."""
    key = MasterKey.generate()
    storage = LocalFolderStorage(tmp_path / "store")
    manifest = crafted_backup(
        storage, key,
        tar_of(Member("PG_VERSION", data=b"17\n"),
               Member("pg_tblspc", tarfile.DIRTYPE, mode=0o700),
               Member("pg_tblspc/16385", tarfile.SYMTYPE, linkname=str(outside))),
        {16385: tar_of(Member("PG_17_202406281", tarfile.DIRTYPE, mode=0o700),
                       Member("PG_17_202406281/5/16386", data=b"rows"))},
    )
    data_dir = tmp_path / "restored"
    unpack_backup(storage, manifest, Keyring([key]), data_dir)
    link = data_dir / "pg_tblspc" / "16385"
    assert link.resolve() == (tablespace_root(data_dir) / "16385").resolve()
    assert (link / "PG_17_202406281/5/16386").read_bytes() == b"rows"


@pytest.mark.parametrize(("case", "start"), [
    ("symlink then write through it", True),
    ("hard link to an absolute path", False),
    ("symlinked directory then a file in it", True),
    ("relative symlink out", False),
])
def test_pitr_of_a_hostile_base_backup_writes_nothing_outside(
    case: str, start: bool, work_dir: Path, prefect_api: str,
) -> None:
    """`pgbackflow pitr` (the CLI, with --start where it chowns) on a crafted base backup:
    one error line naming the archive and the member; the canaries are untouched."""
    outside = work_dir / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_text("precious\n")
    (outside / "canary.txt").chmod(0o600)
    before = snapshot(outside)
    key = MasterKey.generate()
    key_file = work_dir / "key"
    write_key_file(key_file, key)
    store = work_dir / "store"
    members, refused, why = hostile_cases(outside)[case]
    manifest = crafted_backup(LocalFolderStorage(store), key, tar_of(*members))
    target = work_dir / "restored"

    done = subprocess.run(
        [*CLI, "pitr", "--from", str(store), "--target", "latest", "--to-dir", str(target),
         "--key-file", str(key_file), *(["--start"] if start else [])],
        env=as_users_run_it({**os.environ, "PREFECT_API_URL": prefect_api}),
        capture_output=True, text=True,
        timeout=300, check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: {store}/{manifest.base.key}: member {refused!r} refused")
    assert why in lines[0]
    assert snapshot(outside) == before
