"""The tags that scope runs and deployments to a database, a storage and a job kind.

Automations, the health check, ``pgbackflow status`` and ``deploy``'s clean-up select runs
and deployments by these tags, so they are built in this one place. No Prefect import: the
flows use it at run time.
"""

from __future__ import annotations

#: Every run a pgbackflow flow makes carries this tag.
PRODUCT_TAG = "pgbackflow"
#: Prefix of :func:`db_tag`.
DB_TAG_PREFIX = "db:"
#: Prefix of :func:`storage_tag`.
STORAGE_TAG_PREFIX = "storage:"
#: Prefix of :func:`job_tag`.
JOB_TAG_PREFIX = "job:"


def db_tag(db_id: str) -> str:
    """The tag that marks a run or deployment as belonging to one database."""
    return DB_TAG_PREFIX + db_id


def storage_tag(name: str) -> str:
    """The tag that marks a run (a maintenance run) as belonging to one storage."""
    return STORAGE_TAG_PREFIX + name


def job_tag(kind: str) -> str:
    """The tag of a job kind (logical, full, incremental, wal, verification, health, ...)."""
    return JOB_TAG_PREFIX + kind


def run_tags(job: str, db_id: str | None) -> list[str]:
    """Tags a flow run adds to itself: the product's, its job's and its database's."""
    tags = [PRODUCT_TAG, job_tag(job)]
    if db_id:
        tags.append(db_tag(db_id))
    return tags
