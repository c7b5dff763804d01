"""Whole collections from the Prefect API.

A filter request returns at most the server's ``PREFECT_SERVER_API_DEFAULT_LIMIT`` items
(200 unless changed), without saying that more exist, and refuses a larger ``limit``: one
``read_deployments()`` is not every deployment once a fleet has more. Anything that must see
all of them (deploy's clean-up, stale automations, ``pgbackflow status``, the verification
history retention reads) reads page by page, in the server's own page size.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")

#: A guard against a server that ignores ``offset`` (the same page again and again).
MAX_PAGES = 10_000


def read_all(read_page: Callable[[int], Sequence[T]], key: Callable[[T], Hashable]) -> list[T]:
    """Call ``read_page(offset)`` until a page comes back empty; every item once.

    Offsets shift when the collection changes meanwhile: sort newest first where items are
    added (an addition then repeats an item, which ``key``, e.g. the id, drops), and read
    again where items may be deleted meanwhile (a deletion can hide one item from one pass).
    """
    items: list[T] = []
    seen: set[Hashable] = set()
    offset = 0
    for _ in range(MAX_PAGES):
        page = read_page(offset)
        if not page:
            return items
        offset += len(page)
        for item in page:
            identity = key(item)
            if identity not in seen:
                seen.add(identity)
                items.append(item)
    raise RuntimeError(f"the Prefect API returned more than {MAX_PAGES} pages")
