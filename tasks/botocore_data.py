"""Lean botocore data: the S3 client without botocore's data for every other AWS service.

Why: creating one S3 client makes botocore load its legacy endpoint table (every service of
every partition, ~7 MB in memory) and the whole S3 service model (100+ operations, ~4 MB),
held as long as the client lives. A backup process has one client per S3 storage, and its
peak memory is budgeted (150 MB for a logical backup, Prefect included).

botocore looks for its data files in ``AWS_DATA_PATH`` folders before its own: we write
trimmed copies there (all partitions and regions but only the services below; the S3 model
with only the operations pgbackflow calls), once per botocore version, under the user's
cache directory. A user's own ``AWS_DATA_PATH`` is left alone, and when the copies cannot be
written botocore's own data is used, as before.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import botocore
import botocore.session

log = logging.getLogger(__name__)

#: Bump when the trimming changes, so older copies are not reused.
LEAN_FORMAT = 3

#: Services whose endpoint entries are kept (sts: assume-role credentials).
ENDPOINT_SERVICES = frozenset({"s3", "sts"})

#: The S3 operations pgbackflow calls (tasks/storage/s3.py); the client has no others.
S3_OPERATIONS = frozenset({
    "AbortMultipartUpload",
    "CompleteMultipartUpload",
    "CreateMultipartUpload",
    "DeleteObject",
    "DeleteObjects",
    "GetObject",
    "HeadBucket",
    "HeadObject",
    "ListMultipartUploads",
    "ListObjectsV2",
    "ListParts",
    "PutObject",
    "UploadPart",
})


def lean_session() -> botocore.session.Session:
    """A botocore session that reads the trimmed data (or botocore's own, see module doc)."""
    session = botocore.session.Session()
    if session.get_config_variable("data_path"):
        return session
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    data_dir = cache / "pgbackflow" / f"botocore-{botocore.__version__}-lean{LEAN_FORMAT}"
    try:
        if not (data_dir / "complete").is_file():
            _write_lean_data(session, data_dir)
            session = botocore.session.Session()  # its loader cached the full data
    except (OSError, KeyError, TypeError, ValueError) as exc:
        log.debug("using botocore's full data: %s", exc)
        return session
    session.set_config_variable("data_path", str(data_dir))
    return session


def trim_endpoints(table: dict[str, Any], services: frozenset[str]) -> dict[str, Any]:
    """``endpoints.json`` with only ``services`` in every partition."""
    partitions = [
        {**partition, "services": {
            name: entry for name, entry in partition["services"].items() if name in services
        }}
        for partition in table["partitions"]
    ]
    return {**table, "partitions": partitions}


def trim_service_model(model: dict[str, Any], operations: frozenset[str]) -> dict[str, Any]:
    """A ``service-2.json`` with only ``operations`` and the shapes they reach."""
    missing = operations - model["operations"].keys()
    if missing:
        raise KeyError(f"operations not in the model: {sorted(missing)}")
    shapes = model["shapes"]
    needed: set[str] = set()
    pending = [
        ref["shape"]
        for name in operations
        for ref in (model["operations"][name].get("input"),
                    model["operations"][name].get("output"),
                    *model["operations"][name].get("errors", []))
        if ref
    ]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        shape = shapes[name]
        pending += [shape[k]["shape"] for k in ("member", "key", "value") if k in shape]
        pending += [member["shape"] for member in shape.get("members", {}).values()]
    return {
        **model,
        "operations": {k: v for k, v in model["operations"].items() if k in operations},
        "shapes": {k: v for k, v in shapes.items() if k in needed},
    }


def _write_lean_data(session: botocore.session.Session, data_dir: Path) -> None:
    loader = session.get_component("data_loader")
    api_version = loader.determine_latest_version("s3", "service-2")
    files = {
        data_dir / "endpoints.json": trim_endpoints(loader.load_data("endpoints"),
                                                    ENDPOINT_SERVICES),
        data_dir / "s3" / api_version / "service-2.json": trim_service_model(
            loader.load_service_model("s3", "service-2", api_version), S3_OPERATIONS
        ),
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(content))
        partial.replace(path)
    # Written last: a half-written folder is never used (and is rewritten next time).
    (data_dir / "complete").write_text("")
