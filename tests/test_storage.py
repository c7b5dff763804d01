"""The storage interface against a real folder and a real (moto) S3 server over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from pgbackflow.blocks.storage import storage_block_from_url
from pgbackflow.tasks.botocore_data import S3_OPERATIONS
from pgbackflow.tasks.errors import (
    ConfigError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from pgbackflow.tasks.storage import (
    INCOMPLETE_DIR,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    LocalFolderStorage,
    S3ObjectStorage,
    Storage,
    multipart_part_size,
)
from tests.fixtures.s3 import S3Bucket

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

# Uneven slice sizes so part boundaries never line up with write calls.
SLICES = (1, 777_777, 3 * MiB + 1, 65_536, 5 * MiB - 3, 12_345)


@pytest.fixture(
    params=[pytest.param("local", id="local"), pytest.param("s3", id="s3", marks=pytest.mark.s3)]
)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each backend in turn: a folder below tmp_path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return LocalFolderStorage(tmp_path / "backups")
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return S3ObjectStorage(
        bucket.bucket,
        "cluster-a",
        endpoint_url=bucket.endpoint_url,
        region=bucket.region,
        access_key_id=bucket.access_key_id,
        secret_access_key=bucket.secret_access_key,
    )


def write_in_slices(storage: Storage, key: str, data: bytes, size_hint: int | None = None) -> None:
    """Write ``data`` through a writer in uneven slices."""
    view = memoryview(data)
    offset = 0
    with storage.open_write(key, size_hint=size_hint) as writer:
        index = 0
        while offset < len(data):
            size = SLICES[index % len(SLICES)]
            assert writer.write(view[offset : offset + size]) == len(view[offset : offset + size])
            offset += size
            index += 1
        assert writer.bytes_written == len(data)


def read_sha256(storage: Storage, key: str) -> tuple[str, int]:
    """Stream ``key`` back in 1 MiB reads; return its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with storage.open_read(key) as reader:
        while chunk := reader.read(MiB):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def incomplete_uploads(storage: Storage) -> list[str]:
    """Keys of multipart uploads in progress (S3) or files in the incomplete area (local)."""
    if isinstance(storage, S3ObjectStorage):
        uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
        return sorted(upload["Key"] for upload in uploads)
    assert isinstance(storage, LocalFolderStorage)
    if not storage.incomplete_folder.exists():
        return []
    return sorted(entry.name for entry in storage.incomplete_folder.iterdir())


# --------------------------------------------------------------------------- both backends


def test_empty_object(storage: Storage) -> None:
    with storage.open_write("manifests/empty.json") as writer:
        assert writer.bytes_written == 0
    [listed] = storage.list()
    assert (listed.key, listed.size) == ("manifests/empty.json", 0)
    assert storage.read_bytes("manifests/empty.json") == b""


def test_small_object_round_trip(storage: Storage) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    payload = b"hello backup\n" * 100
    with storage.open_write("dumps/db1/small.bin") as writer:
        writer.write(payload[:7])
        writer.write(memoryview(payload)[7:])
    stat = storage.stat("dumps/db1/small.bin")
    assert stat.key == "dumps/db1/small.bin"
    assert stat.size == len(payload)
    assert stat.modified.tzinfo is not None
    assert stat.modified.utcoffset() == timedelta(0)
    assert before <= stat.modified <= datetime.now(UTC) + timedelta(seconds=5)
    assert storage.read_bytes("dumps/db1/small.bin") == payload


def test_multipart_object_streams_back_equal(storage: Storage) -> None:
    data = os.urandom(20 * MiB + 4321)
    write_in_slices(storage, "base/big.tar.zst.enc", data)
    assert read_sha256(storage, "base/big.tar.zst.enc") == (
        hashlib.sha256(data).hexdigest(),
        len(data),
    )
    assert storage.stat("base/big.tar.zst.enc").size == len(data)
    assert incomplete_uploads(storage) == []
    if isinstance(storage, S3ObjectStorage):
        # A multipart ETag ends in -<parts>: full parts + the rest.
        head = storage.client.head_object(
            Bucket=storage.bucket, Key="cluster-a/base/big.tar.zst.enc"
        )
        parts = -(-len(data) // MIN_PART_SIZE)
        assert head["ETag"].strip('"').endswith(f"-{parts}")


def test_reader_supports_partial_reads(storage: Storage) -> None:
    data = bytes(range(256)) * 1000
    storage.write_bytes("wal/000000010000000000000001", data)
    with storage.open_read("wal/000000010000000000000001") as reader:
        assert reader.read(10) == data[:10]
        assert reader.read(300) == data[10:310]
        assert reader.read() == data[310:]
        assert reader.read(10) == b""


def test_overwrite_replaces_content(storage: Storage) -> None:
    storage.write_bytes("latest.json", b"old")
    storage.write_bytes("latest.json", b"newer content")
    assert storage.read_bytes("latest.json") == b"newer content"
    assert [obj.key for obj in storage.list()] == ["latest.json"]


def test_list_filters_by_prefix_and_sorts(storage: Storage) -> None:
    contents = {"b/2": b"22", "a/1": b"1", "a/10": b"1010", "a/2/x": b"x" * 5, "ab": b"ab!"}
    for key, data in contents.items():
        storage.write_bytes(key, data)
    listed = storage.list()
    assert [obj.key for obj in listed] == ["a/1", "a/10", "a/2/x", "ab", "b/2"]
    assert {obj.key: obj.size for obj in listed} == {k: len(v) for k, v in contents.items()}
    assert [obj.key for obj in storage.list("a/")] == ["a/1", "a/10", "a/2/x"]
    assert [obj.key for obj in storage.list("a")] == ["a/1", "a/10", "a/2/x", "ab"]
    assert [obj.key for obj in storage.list("a/1")] == ["a/1", "a/10"]
    assert [obj.key for obj in storage.list("a/2/")] == ["a/2/x"]
    assert storage.list("zzz/") == []


def test_stat_exists_delete(storage: Storage) -> None:
    storage.write_bytes("dumps/x/one", b"1")
    storage.write_bytes("dumps/x/two", b"22")
    assert storage.exists("dumps/x/one")
    assert not storage.exists("dumps/x/three")
    storage.delete("dumps/x/one")
    assert not storage.exists("dumps/x/one")
    with pytest.raises(ObjectNotFoundError):
        storage.stat("dumps/x/one")
    # Deleting a missing object is a no-op, so retention can be retried safely.
    storage.delete("dumps/x/one")
    assert [obj.key for obj in storage.list()] == ["dumps/x/two"]
    storage.delete("dumps/x/two")
    assert storage.list() == []


def test_missing_key_raises_object_not_found(storage: Storage) -> None:
    storage.write_bytes("present", b"here")
    with pytest.raises(ObjectNotFoundError, match=r"dumps/nope\.bin"):
        storage.stat("dumps/nope.bin")
    with pytest.raises(ObjectNotFoundError, match=r"dumps/nope\.bin"):
        storage.open_read("dumps/nope.bin")
    with pytest.raises(ObjectNotFoundError) as raised:
        storage.open_read("missing")
    assert "\n" not in str(raised.value)
    assert storage.location in str(raised.value)


def test_exception_inside_with_publishes_nothing(storage: Storage) -> None:
    with pytest.raises(RuntimeError, match="producer failed"), storage.open_write("dumps/bad") as w:
        # Past the first part, so S3 has a multipart upload to abort.
        w.write(os.urandom(9 * MiB))
        raise RuntimeError("producer failed")
    assert storage.list() == []
    assert not storage.exists("dumps/bad")
    assert incomplete_uploads(storage) == []


def test_explicit_abort_publishes_nothing(storage: Storage) -> None:
    writer = storage.open_write("dumps/aborted")
    writer.write(os.urandom(9 * MiB))
    writer.abort()
    writer.abort()
    assert writer.closed
    with pytest.raises(ValueError, match="aborted"):
        writer.write(b"more")
    with pytest.raises(ValueError, match="aborted"):
        writer.close()
    assert storage.list() == []
    assert incomplete_uploads(storage) == []


def test_unclosed_writer_is_invisible(storage: Storage) -> None:
    writer = storage.open_write("dumps/in-progress")
    writer.write(b"partial")
    assert storage.list() == []
    assert not storage.exists("dumps/in-progress")
    writer.close()
    assert [obj.key for obj in storage.list()] == ["dumps/in-progress"]


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../outside", "a/../../b", "a//b", "a/./b", "trailing/", "..", "nul\x00"],
)
def test_bad_keys_are_refused(storage: Storage, key: str) -> None:
    for operation in (storage.open_write, storage.open_read, storage.stat, storage.delete):
        with pytest.raises(ConfigError, match="storage key"):
            operation(key)
    with pytest.raises(ConfigError, match="storage prefix"):
        storage.list("../")
    assert storage.list() == []


def test_check_writable_passes_and_leaves_nothing(storage: Storage) -> None:
    storage.check_writable()
    assert storage.list() == []


CHILD_WRITER = r"""
import json, os, sys, time
from pathlib import Path
from pgbackflow.tasks.storage import LocalFolderStorage, S3ObjectStorage

spec = json.loads(sys.argv[1])
if spec["kind"] == "local":
    storage = LocalFolderStorage(Path(spec["folder"]))
else:
    # Credentials come from the AWS_* variables the s3_bucket fixture set.
    storage = S3ObjectStorage(spec["bucket"], spec["prefix"], endpoint_url=spec["endpoint_url"])
writer = storage.open_write(spec["key"])
chunk = os.urandom(1024 * 1024)
for _ in range(spec["mib"]):
    writer.write(chunk)
print("halfway", flush=True)
time.sleep(600)
"""


def wait_for_line(process: subprocess.Popen[str], expected: str, timeout: float) -> None:
    """Wait until ``process`` prints ``expected``; fail with its stderr otherwise."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if line.strip() != expected:
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"writer child printed {line!r} instead of {expected!r}: {stderr}")


def test_killed_writer_leaves_no_object(storage: Storage) -> None:
    spec: dict[str, str | int]
    if isinstance(storage, S3ObjectStorage):
        spec = {
            "kind": "s3",
            "bucket": storage.bucket,
            "prefix": storage.prefix,
            "endpoint_url": storage.endpoint,
        }
    else:
        assert isinstance(storage, LocalFolderStorage)
        spec = {"kind": "local", "folder": str(storage.folder)}
    # 20 MiB: S3 has started the multipart upload and sent part 1 before "halfway".
    spec |= {"key": "physical/c1/base/b1/killed.tar", "mib": 20}
    started = datetime.now(UTC)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_WRITER, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_line(child, "halfway", timeout=60)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.communicate()

    assert storage.list() == []
    with pytest.raises(ObjectNotFoundError):
        storage.stat("physical/c1/base/b1/killed.tar")
    assert not storage.exists("physical/c1/base/b1/killed.tar")

    if isinstance(storage, S3ObjectStorage):
        [upload] = storage.client.list_multipart_uploads(Bucket=storage.bucket)["Uploads"]
        assert upload["Key"] == "cluster-a/physical/c1/base/b1/killed.tar"
        if upload["Initiated"] > started - timedelta(minutes=1):
            # moto reports a fixed 2010 start time; real S3 reports the real one.
            assert storage.sweep_incomplete_uploads(older_than=timedelta(hours=1)) == 0
        assert storage.sweep_incomplete_uploads(older_than=timedelta(0)) == 1
    else:
        assert isinstance(storage, LocalFolderStorage)
        [leftover] = incomplete_uploads(storage)
        # The child's data reached the temp file (all but its last buffered write).
        assert (storage.incomplete_folder / leftover).stat().st_size >= 16 * MiB
        assert storage.sweep_incomplete(older_than=timedelta(hours=1)) == 0
        assert storage.sweep_incomplete(older_than=timedelta(0)) == 1
    assert incomplete_uploads(storage) == []

    data = os.urandom(MiB + 17)
    write_in_slices(storage, "physical/c1/base/b1/killed.tar", data)
    assert storage.read_bytes("physical/c1/base/b1/killed.tar") == data
    assert [obj.key for obj in storage.list()] == ["physical/c1/base/b1/killed.tar"]


# --------------------------------------------------------------------------- part sizes


def test_part_size_schedule_without_hint() -> None:
    sizes = [multipart_part_size(n, None) for n in range(1, MAX_PARTS + 1)]
    assert sizes[:1000] == [MIN_PART_SIZE] * 1000
    assert sizes[1000] == 2 * MIN_PART_SIZE
    assert max(sizes) <= MAX_PART_SIZE == 5 * GiB
    assert sizes == sorted(sizes)
    assert sum(sizes) >= 5 * TiB


@pytest.mark.parametrize("hint", [0, 1, 100 * MiB, 80 * GiB, 1 * TiB, 5 * TiB])
def test_part_size_schedule_with_hint(hint: int) -> None:
    sizes = {multipart_part_size(n, hint) for n in (1, 2, 999, 1001, 5000, MAX_PARTS)}
    assert len(sizes) == 1, "a size hint gives constant parts"
    [size] = sizes
    assert MIN_PART_SIZE <= size <= MAX_PART_SIZE
    assert size % MiB == 0
    # The hinted size plus 20 % slack fits in 10,000 parts.
    assert size * MAX_PARTS >= hint * 1.2


def test_part_size_rejects_out_of_range() -> None:
    for number in (0, MAX_PARTS + 1):
        with pytest.raises(ValueError, match="part number"):
            multipart_part_size(number, None)
    with pytest.raises(ValueError, match="negative"):
        multipart_part_size(1, -1)


# --------------------------------------------------------------------------- botocore data


def test_s3_client_loads_trimmed_botocore_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("AWS_DATA_PATH", raising=False)
    endpoints = {
        region: S3ObjectStorage("bucket", region=region).endpoint
        for region in ("eu-west-1", "cn-north-1", "us-gov-west-1")
    }
    # Region endpoints resolve as with botocore's full table, in every partition.
    assert endpoints == {
        "eu-west-1": "https://s3.eu-west-1.amazonaws.com",
        "cn-north-1": "https://s3.cn-north-1.amazonaws.com.cn",
        "us-gov-west-1": "https://s3.us-gov-west-1.amazonaws.com",
    }
    [data_dir] = tmp_path.glob("pgbackflow/botocore-*-lean*")
    table = json.loads((data_dir / "endpoints.json").read_text())
    services = {name for partition in table["partitions"] for name in partition["services"]}
    assert services == {"s3", "sts"}
    assert {p["partition"] for p in table["partitions"]} >= {"aws", "aws-cn", "aws-us-gov"}
    assert (data_dir / "endpoints.json").stat().st_size < 200_000  # botocore's: megabytes
    # The client knows exactly the operations pgbackflow calls.
    client = S3ObjectStorage("bucket", region="eu-west-1").client
    assert set(client.meta.service_model.operation_names) == S3_OPERATIONS


def test_trimmed_s3_model_covers_every_call_the_storage_makes() -> None:
    """Every ``_client.<operation>(`` in tasks/storage/ is in the trimmed model."""
    from botocore import xform_name

    package = Path(__file__).parents[1] / "tasks" / "storage"
    source = "".join(path.read_text() for path in sorted(package.glob("*.py")))
    called = set(re.findall(r"_client\.(\w+)\(", source)) - {"get_paginator"}
    called |= set(re.findall(r'get_paginator\("(\w+)"\)', source))
    assert "upload_part" in called and "list_objects_v2" in called
    assert called <= {xform_name(name) for name in S3_OPERATIONS}


def test_s3_client_keeps_the_users_aws_data_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path / "theirs"))
    assert S3ObjectStorage("bucket", region="eu-west-1").endpoint.endswith("amazonaws.com")
    assert not (tmp_path / "cache").exists()


def test_s3_client_works_when_the_cache_is_unwritable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.delenv("AWS_DATA_PATH", raising=False)
    assert S3ObjectStorage("b", region="eu-west-1").endpoint == "https://s3.eu-west-1.amazonaws.com"


# --------------------------------------------------------------------------- local only


def test_read_only_folder_gives_clear_error(read_only_dir: Path) -> None:
    for folder in (read_only_dir, read_only_dir / "missing" / "backups"):
        storage = LocalFolderStorage(folder)
        expected = (
            f"local storage folder '{folder}' is not writable (Read-only file system): "
            "fix its permissions or choose another folder"
        )
        with pytest.raises(StorageError) as raised:
            storage.open_write("dumps/x")
        assert str(raised.value) == expected
        with pytest.raises(StorageError) as raised:
            storage.check_writable()
        assert str(raised.value) == expected
        assert storage.list() == []


def test_folder_that_is_a_file_gives_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("I am a file")
    for folder in (blocker, blocker / "backups"):
        with pytest.raises(StorageError, match=re.escape(f"'{folder}' is not writable")) as raised:
            LocalFolderStorage(folder).check_writable()
        assert "choose another folder" in str(raised.value)
    assert blocker.read_text() == "I am a file"


def test_missing_folder_is_created_and_incomplete_area_hidden(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path / "deep" / "new" / "backups")
    assert storage.list() == []
    writer = storage.open_write("a/b/c.bin")
    writer.write(b"data")
    assert (tmp_path / "deep" / "new" / "backups" / INCOMPLETE_DIR).is_dir()
    assert storage.list() == []
    assert storage.sweep_incomplete(older_than=timedelta(hours=1)) == 0
    writer.close()
    assert (tmp_path / "deep/new/backups/a/b/c.bin").read_bytes() == b"data"
    assert [obj.key for obj in storage.list()] == ["a/b/c.bin"]
    storage.delete("a/b/c.bin")
    # Emptied folders go too, so retention leaves no skeleton behind.
    assert sorted(p.name for p in storage.folder.iterdir()) == [INCOMPLETE_DIR]


# --------------------------------------------------------------------------- S3 only


@pytest.mark.s3
def test_object_of_exactly_one_part_is_a_single_put(s3_bucket: S3Bucket) -> None:
    storage = storage_block_from_url(f"s3://{s3_bucket.bucket}").open()
    assert isinstance(storage, S3ObjectStorage)
    data = os.urandom(MIN_PART_SIZE)
    write_in_slices(storage, "one-part", data)
    head = storage.client.head_object(Bucket=s3_bucket.bucket, Key="one-part")
    assert "-" not in head["ETag"]
    assert storage.read_bytes("one-part") == data


def test_s3_sweep_spares_progressing_uploads_and_other_tools_uploads(
    s3_bucket: S3Bucket,
) -> None:
    """Without a prefix the bucket may be shared: only pgbackflow's own folders are swept,
    and an upload counts as stale by its last part (a base backup may upload for longer
    than the grace period). moto reports a 2010 start for every upload."""
    storage = S3ObjectStorage(s3_bucket.bucket, endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    client = storage.client
    bucket = s3_bucket.bucket
    foreign = client.create_multipart_upload(Bucket=bucket, Key="other-tool/big.bin")
    planted = client.create_multipart_upload(Bucket=bucket, Key="logical/db/../escape")
    idle = client.create_multipart_upload(Bucket=bucket, Key="logical/db/b1/dump.pgbf")
    moving = client.create_multipart_upload(Bucket=bucket, Key="physical/c/base/b2/base.tar.pgbf")
    client.upload_part(Bucket=bucket, Key="physical/c/base/b2/base.tar.pgbf", PartNumber=1,
                       UploadId=moving["UploadId"], Body=b"part one")
    started = client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["Initiated"]
    assert started < datetime.now(UTC) - timedelta(days=1)  # else this test proves nothing

    listed = storage.list_stale_writes(timedelta(hours=1))
    assert [line.split(" ")[0] for line in listed] == [f"s3://{bucket}/logical/db/b1/dump.pgbf"]
    activity = storage.write_activity(["physical/", "logical/", "other-tool/", ""])
    assert activity.progress.keys() == {"physical/c/base/b2", "logical/db/b1"}
    assert activity.last("physical/c/base/b2") == max(
        p["LastModified"] for p in client.list_parts(
            Bucket=bucket, Key="physical/c/base/b2/base.tar.pgbf",
            UploadId=moving["UploadId"])["Parts"])
    assert storage.sweep_incomplete_uploads(timedelta(hours=1)) == 1
    left = {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]}
    assert left == {foreign["UploadId"], planted["UploadId"], moving["UploadId"]}
    assert idle["UploadId"] not in left
    # Once its last part is older than the grace period, the moving upload goes too.
    assert storage.sweep_incomplete_uploads(timedelta(0)) == 1
    left = {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]}
    assert left == {foreign["UploadId"], planted["UploadId"]}


def test_s3_upload_whose_parts_cannot_be_listed_counts_as_in_progress(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    """A role without s3:ListMultipartUploadParts (older setups): nothing tells a live
    upload from a dead one, so none is aborted and retention keeps its folder, with a
    warning naming the permission. (moto enforces no policies: the server's AccessDenied
    answer is injected into the client, the only fake in this file.)"""
    storage = S3ObjectStorage(s3_bucket.bucket, "pg", endpoint_url=s3_bucket.endpoint_url,
                              region=s3_bucket.region)
    key = "pg/logical/db/b1/dump.pgbf"
    storage.client.create_multipart_upload(Bucket=s3_bucket.bucket, Key=key)

    def denied(**_: object) -> tuple[object, dict[str, object]]:
        error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                 "ResponseMetadata": {"HTTPStatusCode": 403}}
        return type("Response", (), {"status_code": 403, "headers": {}})(), error

    storage.client.meta.events.register("before-call.s3.ListParts", denied)
    assert storage.list_stale_writes(timedelta(0)) == ()
    assert storage.sweep_incomplete_uploads(timedelta(0)) == 0
    activity = storage.write_activity(["logical/"])
    last = activity.last("logical/db/b1")
    assert last is not None and last > datetime.now(UTC) - timedelta(minutes=1)
    assert "s3:ListMultipartUploadParts" in caplog.text
    assert [u["Key"] for u in storage.client.list_multipart_uploads(
        Bucket=s3_bucket.bucket)["Uploads"]] == [key]


@pytest.mark.s3
def test_size_hint_uses_constant_parts(s3_bucket: S3Bucket) -> None:
    storage = storage_block_from_url(f"s3://{s3_bucket.bucket}/hinted").open()
    assert isinstance(storage, S3ObjectStorage)
    data = os.urandom(9 * MiB)
    write_in_slices(storage, "x", data, size_hint=len(data))
    head = storage.client.head_object(Bucket=s3_bucket.bucket, Key="hinted/x")
    assert head["ETag"].strip('"').endswith("-2")
    assert read_sha256(storage, "x") == (hashlib.sha256(data).hexdigest(), len(data))


@pytest.mark.s3
def test_missing_bucket_gives_clear_error(s3_bucket: S3Bucket) -> None:
    storage = S3ObjectStorage("no-such-bucket-here", endpoint_url=s3_bucket.endpoint_url)
    expected = (
        f"S3 bucket 'no-such-bucket-here' does not exist at {s3_bucket.endpoint_url}: "
        "create it or fix the bucket name"
    )
    with pytest.raises(StorageError) as raised:
        storage.check_writable()
    assert str(raised.value) == expected
    assert not isinstance(raised.value, TransientStorageError)
    for operation in (storage.list, lambda: storage.stat("x"), lambda: storage.open_read("x")):
        with pytest.raises(StorageError) as raised:
            operation()
        assert str(raised.value) == expected
    with pytest.raises(StorageError, match="does not exist"):
        write_in_slices(storage, "big", os.urandom(9 * MiB))


def post_moto_auth(endpoint: str, initial_no_auth_count: str) -> None:
    """Switch moto's credential checks on ("0") or off ("inf") for the whole server."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=initial_no_auth_count.encode(),
        # Not form-encoded: moto reads the raw body.
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture
def moto_auth(s3_bucket: S3Bucket) -> Iterator[tuple[str, str]]:
    """Enforce credentials on the moto server; yield a real IAM user's key pair."""
    iam = boto3.client(
        "iam",
        endpoint_url=s3_bucket.endpoint_url,
        region_name=s3_bucket.region,
        aws_access_key_id=s3_bucket.access_key_id,
        aws_secret_access_key=s3_bucket.secret_access_key,
    )
    user = f"backup-{s3_bucket.bucket}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    post_moto_auth(s3_bucket.endpoint_url, "0")
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        post_moto_auth(s3_bucket.endpoint_url, "inf")


@pytest.mark.s3
def test_wrong_credentials_give_clear_error(
    s3_bucket: S3Bucket, moto_auth: tuple[str, str]
) -> None:
    key_id, secret = moto_auth
    cases = {
        "InvalidAccessKeyId": ("AKIAUNKNOWNKEY000000", "unknown-secret-value"),
        "SignatureDoesNotMatch": (key_id, "wrong-secret-value-123"),
        # A real user without any policy: authenticated, but not allowed.
        "AccessDenied": (key_id, secret),
    }
    for code, (access_key_id, secret_access_key) in cases.items():
        storage = S3ObjectStorage(
            s3_bucket.bucket,
            "cluster-a",
            endpoint_url=s3_bucket.endpoint_url,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
        )
        with pytest.raises(StorageError) as raised:
            storage.check_writable()
        message = str(raised.value)
        assert message.startswith(f"S3 at {s3_bucket.endpoint_url} denied access to bucket ")
        assert f"'{s3_bucket.bucket}'" in message
        assert f"({code})" in message
        assert "check the access key id, secret access key and the bucket policy" in message
        assert secret_access_key not in message
        assert secret_access_key not in repr(storage)
        assert "\n" not in message
        with pytest.raises(StorageError, match=f"denied access.*{code}"):
            storage.list()


@pytest.mark.s3
def test_unreachable_endpoint_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe socket is closed.
    storage = S3ObjectStorage(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id="x",
        secret_access_key="y",
        max_attempts=1,
    )
    with pytest.raises(TransientStorageError) as raised:
        storage.list()
    assert str(raised.value).startswith(f"could not reach S3 endpoint http://127.0.0.1:{port} ")
    assert raised.value.transient


@pytest.mark.s3
def test_storage_block_from_url_reads_aws_environment(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    storage = storage_block_from_url(f"s3://{s3_bucket.bucket}/some/prefix/").open()
    assert isinstance(storage, S3ObjectStorage)
    assert storage.location == f"s3://{s3_bucket.bucket}/some/prefix"
    assert storage.endpoint == s3_bucket.endpoint_url
    storage.write_bytes("k", b"v")
    client: S3Client = s3_bucket.client()
    assert client.get_object(Bucket=s3_bucket.bucket, Key="some/prefix/k")["Body"].read() == b"v"

    local = storage_block_from_url(f"file://{tmp_path}/a").open()
    assert isinstance(local, LocalFolderStorage)
    assert local.folder == tmp_path / "a"
    assert storage_block_from_url(str(tmp_path / "b")).open().location == str(tmp_path / "b")
    with pytest.raises(ConfigError, match="unsupported scheme 'gs'"):
        storage_block_from_url("gs://bucket/x")
    with pytest.raises(ConfigError, match="bucket name"):
        S3ObjectStorage("s3://bucket")


@pytest.mark.s3
def test_background_part_failure_surfaces_and_aborts(s3_bucket: S3Bucket) -> None:
    storage = storage_block_from_url(f"s3://{s3_bucket.bucket}").open()
    writer = storage.open_write("doomed")
    writer.write(os.urandom(9 * MiB))  # part 1 is handed to the upload thread
    s3_bucket.client().delete_bucket(Bucket=s3_bucket.bucket)
    # Part 1 may have landed before the bucket went; a later part cannot. Whichever fails,
    # the failure surfaces at the next write that waits for it (at the latest at close).
    with pytest.raises(StorageError, match=f"S3 bucket '{s3_bucket.bucket}' does not exist"):
        for _ in range(3):
            writer.write(os.urandom(8 * MiB))
        writer.close()
    assert writer.closed
    with pytest.raises(ValueError, match="aborted"):
        writer.write(b"x")
