"""Combining a chain in place gives, byte for byte, what pg_combinebackup writes.

Real plain-format backups taken with pg_basebackup (PostgreSQL 17 and 18), with changes
between them that exercise every rule: changed blocks, a relation truncated by VACUUM and
then extended again, dropped and created tables and databases, a TRUNCATE (new file).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from pgbackflow.tasks.cluster import EphemeralCluster
from pgbackflow.tasks.combine import (
    BLOCK_SIZE,
    INCREMENTAL_MAGIC,
    CombineError,
    IncrementalFile,
    combine_in_place,
)
from pgbackflow.tasks.process import Tool
from tests.test_physical import cluster_or_skip

pytestmark = pytest.mark.pg


def _basebackup(server: EphemeralCluster, target: Path, since: Path | None = None) -> None:
    args: list[str | Path] = [
        "-d", server.conninfo(), "-D", target, "-Fp", "-c", "fast", "--no-sync",
    ]
    if since is not None:
        args += ["--incremental", since / "backup_manifest"]
    Tool(server.toolset.binary("pg_basebackup")).run(
        args, env={**os.environ, "PGPASSWORD": server.password}, timeout=300)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every directory (None) and file (its bytes) under ``root``, by relative path."""
    found: dict[str, bytes | None] = {}
    for folder, subfolders, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        for name in subfolders:
            found[os.path.normpath(os.path.join(relative, name))] = None
        for name in files:
            found[os.path.normpath(os.path.join(relative, name))] = Path(folder, name).read_bytes()
    return found


def _assert_same_tree(ours: Path, reference: Path) -> None:
    mine, theirs = _tree(ours), _tree(reference)
    assert sorted(mine.keys() - theirs.keys()) == [], "only in ours"
    assert sorted(theirs.keys() - mine.keys()) == [], "only in pg_combinebackup's"
    differing = [name for name in theirs if mine[name] != theirs[name]]
    assert differing == []


def _combine_copy(work: Path, name: str, backups: list[Path]) -> Path:
    """Our combine over copies (it consumes the incrementals' folders)."""
    copies = []
    for backup in backups:
        copy = work / f"{name}-{backup.name}"
        shutil.copytree(backup, copy, symlinks=True)
        copies.append(copy)
    combine_in_place(copies[0], copies[1:])
    return copies[0]


@pytest.mark.parametrize("major", [17, 18])
def test_in_place_combine_equals_pg_combinebackup(
    major: int, pg_majors: tuple[int, ...], work_dir: Path
) -> None:
    backups = [work_dir / "full", work_dir / "inc1", work_dir / "inc2"]
    with cluster_or_skip(major, pg_majors, autovacuum="off") as server:
        with server.connect() as conn:
            conn.autocommit = True
            conn.execute("CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 4) AS v "
                         "FROM generate_series(1, 60000) g")
            conn.execute("CREATE TABLE shrinks AS SELECT g AS id, repeat('x', 200) AS v "
                         "FROM generate_series(1, 30000) g")
            conn.execute("CREATE TABLE dropped AS SELECT g AS id FROM generate_series(1, 5000) g")
            conn.execute("CREATE TABLE emptied AS SELECT g AS id FROM generate_series(1, 5000) g")
            conn.execute("CREATE DATABASE goes_away")
            conn.execute("VACUUM (FREEZE)")
        _basebackup(server, backups[0])
        with server.connect() as conn:
            conn.autocommit = True
            conn.execute("UPDATE big SET v = upper(v) WHERE id % 50 = 0")
            conn.execute("DELETE FROM shrinks WHERE id > 5000")
            conn.execute("VACUUM shrinks")  # truncates the file: a shorter truncation length
            conn.execute("DROP TABLE dropped")
            conn.execute("TRUNCATE emptied")
            conn.execute("CREATE TABLE born AS SELECT g AS id FROM generate_series(1, 3000) g")
            conn.execute("DROP DATABASE goes_away")
            conn.execute("CREATE DATABASE arrives")
            conn.execute("CHECKPOINT")
        _basebackup(server, backups[1], since=backups[0])
        with server.connect() as conn:
            conn.autocommit = True
            # Grows again past where VACUUM cut it: blocks the full still had come back.
            conn.execute("INSERT INTO shrinks SELECT g, repeat('y', 200) "
                         "FROM generate_series(5001, 12000) g")
            conn.execute("UPDATE big SET v = lower(v) WHERE id % 70 = 0")
            conn.execute("INSERT INTO emptied SELECT g FROM generate_series(1, 100) g")
            conn.execute("CHECKPOINT")
        _basebackup(server, backups[2], since=backups[1])
        combinebackup = Tool(server.toolset.binary("pg_combinebackup"))
        for count in (2, 3):
            reference = work_dir / f"reference-{count}"
            combinebackup.run([*backups[:count], "--output", reference, "--no-manifest",
                               "--no-sync"], timeout=300)
            ours = _combine_copy(work_dir, f"ours-{count}", backups[:count])
            _assert_same_tree(ours, reference)

        # The incrementals really carried INCREMENTAL files (the comparison meant something).
        assert any(p.name.startswith("INCREMENTAL.") for p in backups[2].rglob("*"))

        # A link left out: the chain check refuses it, naming the folder.
        skipped = _combine_copy_error(work_dir, [backups[0], backups[2]])
        assert "inc2" in skipped and "other than the one before it" in skipped


def _combine_copy_error(work: Path, backups: list[Path]) -> str:
    with pytest.raises(CombineError) as caught:
        _combine_copy(work, "broken", backups)
    return str(caught.value)


def _incremental(path: Path, blocks: list[int], truncation: int, *, cut: int = 0,
                 magic: int = INCREMENTAL_MAGIC) -> Path:
    header = struct.pack(f"<III{len(blocks)}I", magic, len(blocks), truncation, *blocks)
    if blocks:
        header += bytes(-len(header) % BLOCK_SIZE)
    data = b"".join(bytes([b % 251 + 1]) * BLOCK_SIZE for b in blocks)
    path.write_bytes((header + data)[:len(header) + len(data) - cut])
    return path


def test_incremental_headers_are_checked(tmp_path: Path) -> None:
    good = IncrementalFile.read(_incremental(tmp_path / "a", [3, 1], 5))
    assert good.blocks == (3, 1) and good.truncation_blocks == 5 and good.length_blocks == 5
    assert good.header_size == BLOCK_SIZE
    assert IncrementalFile.read(_incremental(tmp_path / "b", [9], 2)).length_blocks == 10
    assert IncrementalFile.read(_incremental(tmp_path / "c", [], 4)).header_size == 12
    with pytest.raises(CombineError, match="not an incremental file"):
        IncrementalFile.read(_incremental(tmp_path / "d", [1], 2, magic=0x12345678))
    with pytest.raises(CombineError, match="cut short"):
        IncrementalFile.read(_incremental(tmp_path / "e", [1, 2], 3, cut=100))
    with pytest.raises(CombineError, match="out of range or repeated"):
        IncrementalFile.read(_incremental(tmp_path / "f", [2, 2], 3))


def test_blocks_follow_pg_combinebackups_rules(tmp_path: Path) -> None:
    """Newest copy of a block wins; past the newest truncation length only the newest
    incremental counts (older content reads as zeros); the file ends at its length."""
    full, first, second = (tmp_path / n for n in ("full", "first", "second"))
    starts = {full: "0/1000028", first: "0/2000028", second: "0/3000028"}
    for root, parent in ((full, None), (first, full), (second, first)):
        (root / "base" / "5").mkdir(parents=True)
        (root / "global").mkdir()
        (root / "global" / "pg_control").write_bytes(struct.pack("<Q", 42) + bytes(100))
        label = f"START WAL LOCATION: {starts[root]} (file x)\nSTART TIMELINE: 1\n"
        if parent is not None:
            label += f"INCREMENTAL FROM LSN: {starts[parent]}\nINCREMENTAL FROM TLI: 1\n"
        (root / "backup_label").write_text(label)
        (root / "PG_VERSION").write_text("17\n")
    six_blocks = b"".join(bytes([0xA0 + n]) * BLOCK_SIZE for n in range(6))
    (full / "base" / "5" / "100").write_bytes(six_blocks)
    (full / "base" / "5" / "200").write_bytes(six_blocks)
    (full / "base" / "5" / "gone").write_bytes(b"x")
    _incremental(first / "base" / "5" / "INCREMENTAL.100", [1, 5], 6)   # blocks 1, 5 changed
    _incremental(second / "base" / "5" / "INCREMENTAL.100", [2], 4)     # cut to 4, block 2 new
    # Cut to 3, then block 5 written: 3 and 4 never written since, so zeros (not the full's
    # nor the first incremental's block 4).
    _incremental(first / "base" / "5" / "INCREMENTAL.200", [4], 6)
    _incremental(second / "base" / "5" / "INCREMENTAL.200", [5], 3)
    combine_in_place(full, [first, second])
    result = (full / "base" / "5" / "100").read_bytes()
    blocks = [result[i:i + BLOCK_SIZE] for i in range(0, len(result), BLOCK_SIZE)]
    assert len(blocks) == 4
    assert blocks[0] == bytes([0xA0]) * BLOCK_SIZE          # from the full
    assert blocks[1] == bytes([1 % 251 + 1]) * BLOCK_SIZE   # from the first incremental
    assert blocks[2] == bytes([2 % 251 + 1]) * BLOCK_SIZE   # from the second
    assert blocks[3] == bytes([0xA3]) * BLOCK_SIZE          # from the full again
    result = (full / "base" / "5" / "200").read_bytes()
    blocks = [result[i:i + BLOCK_SIZE] for i in range(0, len(result), BLOCK_SIZE)]
    assert [b[0] for b in blocks] == [0xA0, 0xA1, 0xA2, 0, 0, 5 % 251 + 1]
    assert blocks[3] == blocks[4] == bytes(BLOCK_SIZE)
    assert not (full / "base" / "5" / "gone").exists()
    assert "INCREMENTAL" not in (full / "backup_label").read_text()
    assert "0/3000028" in (full / "backup_label").read_text()
