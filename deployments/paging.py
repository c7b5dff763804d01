"""Whole collections from the Prefect API.

A filter request returns at most the server's ``PREFECT_SERVER_API_DEFAULT_LIMIT`` items
(200 unless changed), without saying that more exist: one ``read_deployments()`` is not
every deployment once a fleet has more. Anything that must see all of them (deploy's
clean-up, stale automations, ``pgbackflow status``) reads page by page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

#: A guard against a server that ignores ``offset`` (the same page again and again).
MAX_PAGES = 10_000


def read_all(read_page: Callable[[int], Sequence[T]]) -> list[T]:
    """Call ``read_page(offset)`` (the server's own page size) until a page comes back empty."""
    items: list[T] = []
    for _ in range(MAX_PAGES):
        page = read_page(len(items))
        if not page:
            return items
        items.extend(page)
    raise RuntimeError(f"the Prefect API returned more than {MAX_PAGES} pages")
