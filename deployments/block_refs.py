"""Looking up a saved Prefect block by ``<block-type-slug>/<name>``, one way for every deploy.

Deployments and automations name blocks the user saved (a database, a storage, a key, a
notification target) and keep only their document id; a name that does not resolve is a
configuration mistake, reported in one line before anything changes.
"""

from __future__ import annotations

from prefect.client.schemas.objects import BlockDocument

from pgbackflow.tasks.errors import ConfigError

#: What to do about a missing block, unless the caller knows better.
CREATE_IT = "create it in the Prefect UI or with Block.save()"


def find_saved_block(slug: str, name: str) -> BlockDocument | None:
    """The saved block document ``slug/name`` without its secrets, or None if there is none
    (a dry run of a deploy that would create it)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(
                name, block_type_slug=slug, include_secrets=False
            )
        except ObjectNotFound:
            return None


def saved_block(slug: str, name: str, what: str, how: str = CREATE_IT) -> BlockDocument:
    """The saved block document ``slug/name``, without its secrets.

    Args:
        slug: The block type's slug, e.g. ``pgbackflow-postgres-database``.
        name: The block document's name.
        what: Which block this is for the user, e.g. ``database`` or
            ``notify.block: notification``: the error reads "``what`` block slug/name ...".
        how: What the user does about a missing block.

    Raises:
        ConfigError: no such block (one line: which block, that it is missing, ``how``).
    """
    document = find_saved_block(slug, name)
    if document is None:
        raise ConfigError(f"{what} block {slug}/{name} does not exist: {how}")
    return document
