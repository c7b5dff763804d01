"""A storage someone else may have written to: links, FIFOs and odd names planted in it.

Whoever can write to a backup folder or bucket can plant more than bad objects: a symbolic
link where pgbackflow expects a folder (so a listing, a sweep or a delete would follow it
out of the storage), a FIFO where it expects a file (so a read would wait for ever), names
with control characters (so output would carry terminal escapes) or with '..' segments
(so a later delete of that name would fail). These tests plant each one and check that
nothing outside the storage is read, written or deleted, that commands end with one line,
and that what is not an object of ours is left out of listings.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest

from pgbackflow.tasks.errors import ConfigError, ObjectNotFoundError, StorageError
from pgbackflow.tasks.keys import MasterKey, write_key_file
from pgbackflow.tasks.retention import LOCK_KEY
from pgbackflow.tasks.storage import INCOMPLETE_DIR, LocalFolderStorage, S3ObjectStorage
from pgbackflow.tasks.storage.base import check_key
from tests.fixtures.prefect_server import PGBACKFLOW, as_users_run_it
from tests.fixtures.s3 import S3Bucket

OLD = timedelta(days=3)


def _victim(tmp_path: Path) -> Path:
    """Files outside the storage, old enough for any sweep or orphan rule to take."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    stamp = (datetime.now(UTC) - OLD).timestamp()
    for name in ("precious.txt", "sub/config.ini", "id_rsa"):
        path = victim / name
        path.write_text(f"keep {name}\n")
        os.utime(path, (stamp, stamp))
    return victim


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _retention(store: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    key_file = tmp_path / "master.key"
    if not key_file.exists():
        write_key_file(key_file, MasterKey.generate())
    return subprocess.run(
        [str(PGBACKFLOW), "retention", "--from", str(store), "--key-file", str(key_file),
         "--keep-last", "1", "--grace-hours", "0", *args],
        capture_output=True, text=True, timeout=120, env=as_users_run_it(dict(os.environ)),
        check=False,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("planted", ["logical", "logical/shop", INCOMPLETE_DIR])
def test_retention_never_follows_a_planted_folder_link(tmp_path: Path, planted: str) -> None:
    """The link replaces a folder retention lists (or the sweep's temporaries folder): the
    run stops with one line naming the link, and nothing it points to is touched."""
    victim = _victim(tmp_path)
    before = _files(victim)
    store = tmp_path / "store"
    link = store.joinpath(*planted.split("/"))
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    result = _retention(store, tmp_path, *(["--db-id", "shop"] if planted == "logical/shop"
                                           else []))
    _one_line_error(result, "symbolic link", f"'{planted}'")
    assert _files(victim) == before
    # A dry run lists the same way: it names the link too, and plans no deletion out there.
    dry = _retention(store, tmp_path, "--dry-run")
    assert str(victim) not in dry.stdout + dry.stderr
    assert _files(victim) == before


def test_a_link_deeper_in_the_tree_is_no_object(tmp_path: Path) -> None:
    """Below the folders a command names, a link (to a folder or to a file) is skipped by
    listings, refused by reads, and a delete of its name removes the link alone."""
    victim = _victim(tmp_path)
    before = _files(victim)
    storage = LocalFolderStorage(tmp_path / "store")
    storage.write_bytes("logical/shop/b1/manifest.json", b"{}")
    (storage.folder / "logical" / "shop" / "b2").symlink_to(victim, target_is_directory=True)
    (storage.folder / "logical" / "shop" / "b1" / "dump.pgbf").symlink_to(victim / "id_rsa")

    assert [o.key for o in storage.list("")] == ["logical/shop/b1/manifest.json"]
    assert [o.key for o in storage.list("logical/shop/")] == ["logical/shop/b1/manifest.json"]
    with pytest.raises(ObjectNotFoundError):
        storage.open_read("logical/shop/b1/dump.pgbf")
    with pytest.raises(ObjectNotFoundError):
        storage.stat("logical/shop/b1/dump.pgbf")
    with pytest.raises(StorageError, match="'logical/shop/b2' is a symbolic link"):
        storage.open_read("logical/shop/b2/precious.txt")
    with pytest.raises(StorageError, match="'logical/shop/b2' is a symbolic link"):
        storage.delete("logical/shop/b2/precious.txt")
    with pytest.raises(StorageError, match="'logical/shop/b2' is a symbolic link"):
        storage.write_bytes("logical/shop/b2/planted.txt", b"x")
    with pytest.raises(StorageError, match="'logical/shop/b2' is a symbolic link"):
        storage.create_new("logical/shop/b2/planted.txt", b"x")
    storage.delete("logical/shop/b1/dump.pgbf")
    assert not (storage.folder / "logical" / "shop" / "b1" / "dump.pgbf").is_symlink()
    assert _files(victim) == before
    assert not [p for p in (storage.folder / INCOMPLETE_DIR).iterdir()], "temporaries left"


def test_writes_and_sweeps_refuse_a_linked_temporaries_folder(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    before = _files(victim)
    storage = LocalFolderStorage(tmp_path / "store")
    storage.folder.mkdir()
    (storage.folder / INCOMPLETE_DIR).symlink_to(victim)
    for attempt in (
        lambda: storage.write_bytes("logical/shop/b1/manifest.json", b"{}"),
        lambda: storage.create_new(LOCK_KEY, b"{}"),
        lambda: storage.sweep_stale_writes(timedelta(0)),
        lambda: storage.list_stale_writes(timedelta(0)),
    ):
        with pytest.raises(StorageError, match=f"'{INCOMPLETE_DIR}' is a symbolic link"):
            attempt()
    assert _files(victim) == before
    assert storage.list("") == []


def test_a_planted_fifo_never_blocks(tmp_path: Path) -> None:
    """A FIFO where a lock or an object should be: reads end at once (no such object), and
    retention says what is in the way of its lock instead of waiting for a writer."""
    storage = LocalFolderStorage(tmp_path / "store")
    storage.write_bytes("logical/shop/b1/manifest.json", b"{}")
    os.mkfifo(storage.folder / "logical" / "shop" / "b1" / "dump.pgbf")
    os.mkfifo(storage.folder / LOCK_KEY)
    started = time.monotonic()
    with pytest.raises(ObjectNotFoundError):
        storage.open_read("logical/shop/b1/dump.pgbf")
    with pytest.raises(ObjectNotFoundError):
        storage.stat("logical/shop/b1/dump.pgbf")
    assert [o.key for o in storage.list("")] == ["logical/shop/b1/manifest.json"]
    assert time.monotonic() - started < 5
    result = _retention(storage.folder, tmp_path)
    _one_line_error(result, LOCK_KEY, "not a lock object", "remove it")


def test_names_with_control_characters_are_no_objects(tmp_path: Path) -> None:
    """Such names cannot be keys pgbackflow writes: listings leave them out, so neither
    `list` nor a retention plan prints a planted line or escape sequence."""
    for bad in ("logical/shop/b\nrefused: none, all verified", "logical/\x1b[2J/x", "a\x9bb"):
        with pytest.raises(ConfigError, match="control character"):
            check_key(bad)
    victim_free = tmp_path / "store"
    storage = LocalFolderStorage(victim_free)
    storage.write_bytes("logical/shop/b1/manifest.json", b"{}")
    planted = victim_free / "logical" / "shop" / "x\nDELETE nothing, all verified"
    planted.mkdir()
    (planted / "manifest.json").write_text("{}")
    (victim_free / "logical" / "\x1b]0;owned\x07").write_text("x")
    # Not UTF-8: 0x9b is the 8-bit CSI of a terminal; Python names it with a lone surrogate.
    os.makedirs(bytes(victim_free / "logical") + b"/\x9b2J\xff")
    (victim_free / "logical" / os.fsdecode(b"\x9b2J\xff") / "manifest.json").write_text("{}")
    assert [o.key for o in storage.list("")] == ["logical/shop/b1/manifest.json"]
    result = _retention(victim_free, tmp_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    assert "DELETE nothing" not in result.stdout + result.stderr
    assert "2J" not in result.stdout + result.stderr


@pytest.mark.s3
def test_odd_s3_keys_are_left_out_and_stop_no_run(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """Keys pgbackflow cannot have written ('..' or empty segments, control characters) are
    not listed; retention over a bucket holding them plans and finishes normally (before,
    it planned them as orphans and then failed on every run at their delete)."""
    client = boto3.client(
        "s3", endpoint_url=s3_bucket.endpoint_url, region_name=s3_bucket.region,
        aws_access_key_id=s3_bucket.access_key_id,
        aws_secret_access_key=s3_bucket.secret_access_key,
    )
    # (moto's HTTP server refuses a newline in a key; an escape sequence gets through.)
    odd = ["pg/logical/shop/../../x", "pg/logical/shop//y", "pg/logical/shop/z\x1b[31mok\x07"]
    for key in [*odd, "pg/logical/shop/b1/stray.bin"]:
        client.put_object(Bucket=s3_bucket.bucket, Key=key, Body=b"1")
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    assert [o.key for o in storage.list("")] == ["logical/shop/b1/stray.bin"]
    key_file = tmp_path / "master.key"
    write_key_file(key_file, MasterKey.generate())
    result = subprocess.run(
        [str(PGBACKFLOW), "retention", "--from", f"s3://{s3_bucket.bucket}/pg", "--key-file",
         str(key_file), "--keep-last", "1", "--grace-hours", "0"],
        capture_output=True, text=True, timeout=120, check=False,
        env=as_users_run_it({**os.environ, "AWS_ENDPOINT_URL": s3_bucket.endpoint_url,
                             "AWS_DEFAULT_REGION": s3_bucket.region,
                             "AWS_ACCESS_KEY_ID": s3_bucket.access_key_id,
                             "AWS_SECRET_ACCESS_KEY": s3_bucket.secret_access_key}),
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    left = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.bucket)["Contents"]}
    # The stray object of ours was an orphan past the grace period: deleted; the odd keys
    # are no objects of ours: left alone.
    assert left == set(odd)
