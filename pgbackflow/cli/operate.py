"""Running pgbackflow: deploy, doctor, status, agent, worker, demo (and the retired notify)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from pgbackflow.cli import render
from pgbackflow.cli.common import (
    ORIGINAL_ENV,
    AsJson,
    prefect_api_errors,
    user_errors,
    user_errors_without_flows,
)
from pgbackflow.cli.render import err, out
from pgbackflow.tasks.errors import PgBackflowError


# No flow runs here: without the flow commands' setup, a --dry-run creates nothing (that
# setup makes the "crash unresponsive runs" automation, which deploy itself plans).
@user_errors_without_flows
def deploy(
    config: Annotated[
        Path, typer.Option("--config", help="The deploy config (docs/CONFIG.md).")
    ] = Path("pgbackflow.toml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan as a diff; change nothing.")
    ] = False,
) -> None:
    """Create or update blocks, work pools, limits, deployments and automations from a config."""
    from pgbackflow.deployments.config import deploy as deploy_config
    from pgbackflow.deployments.config import load_config
    from pgbackflow.deployments.security import check_prefect_security

    settings = load_config(config)
    with prefect_api_errors():
        result = deploy_config(settings, dry_run=dry_run)
        # After the deploy: a config error stays the one line it is.
        render.security_warnings(check_prefect_security(scheduled=True))
    out.print(result.render(), highlight=False, markup=False)
    if dry_run:
        err.print("dry run: nothing was changed")
    else:  # the plan reads the same either way: say that this one was carried out
        from pgbackflow.flows.common import prefect_api_url

        where = prefect_api_url() or "Prefect's temporary API (gone when this command ends)"
        err.print(f"applied to the Prefect server at {where}", highlight=False,
                  soft_wrap=True)


@user_errors_without_flows  # it only reads
def doctor(
    as_json: AsJson = False,
) -> None:
    """Check the Prefect side: API authentication, the server's encryption key, its database.

    One line per check (ok, warning, or note when it cannot be checked from here); exit 1
    when there is a warning. Run it where the Prefect server runs, with its environment, to
    check the server's own settings.
    """
    from pgbackflow.deployments.security import check_prefect_security

    with prefect_api_errors():
        findings = check_prefect_security()
    render.doctor_findings(findings, as_json)
    if any(f.level == "warning" for f in findings):
        raise typer.Exit(1)


@user_errors
def notify(ctx: typer.Context) -> None:
    """Gone: notifications are the deploy config's ``[notify]`` (one writer of automations)."""
    from pgbackflow.tasks.errors import ConfigError

    raise ConfigError(
        "pgbackflow notify is gone: set notifications in the deploy config's [notify] section "
        "(block, on_failure, on_success; README, Notifications) and run pgbackflow deploy"
    )


@user_errors_without_flows
def daemon(
    action: Annotated[str, typer.Argument(help="status: list them; stop: stop them all.")],
    as_json: AsJson = False,
) -> None:
    """This user's warm pgbackflow daemons (they run commands without Python's start-up
    cost; PGBACKFLOW_DAEMON=off does without them)."""
    from pgbackflow.launcher import running_daemons, stop_daemons

    if action not in ("status", "stop"):
        raise PgBackflowError(f"daemon {action}: unknown action; use status or stop")
    daemons = running_daemons(os.environ) if action == "status" else stop_daemons(os.environ)
    render.daemons(action, daemons, as_json)


@user_errors
def status(
    as_json: AsJson = False,
) -> None:
    """The fleet status: every database's health as its last health check saw it."""
    from pgbackflow.flows.common import prefect_api_url
    from pgbackflow.flows.health import load_states
    from pgbackflow.tasks.errors import ConfigError
    from pgbackflow.tasks.health import fleet_rows

    if not prefect_api_url():
        raise ConfigError("status reads the health checks from a Prefect server: set "
                          "PREFECT_API_URL (deploy health checks with pgbackflow deploy)")
    render.fleet_status(fleet_rows(load_states()), as_json)


@user_errors
def agent(
    pool: Annotated[str, typer.Option("--pool", help="Prefect work pool to serve.")],
    max_cpu: Annotated[float, typer.Option("--max-cpu", help="CPU cores for all jobs.")] = 2,
    max_ram_mb: Annotated[int, typer.Option("--max-ram-mb", help="Memory for all jobs.")] = 2048,
    max_disk_gb: Annotated[float, typer.Option("--max-disk-gb", help="Disk budget.")] = 20,
    max_concurrent_jobs: Annotated[
        int, typer.Option("--max-concurrent-jobs", help="Verifications at once (wish).")
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; start nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Run a verification agent: a Prefect worker for POOL inside a resource budget."""
    from pgbackflow.tasks.budget import plan_budget

    plan = plan_budget(max_cpu, max_ram_mb, max_disk_gb, max_concurrent_jobs)
    if plan.note:
        err.print(f"[bold yellow]{plan.note}[/]")
    from pgbackflow.worker import worker_command

    command = worker_command(pool, f"pgbackflow-agent-{os.uname().nodename}",
                             plan.concurrent_jobs)
    render.agent_plan(pool, plan, command, max_disk_gb, as_json)
    if dry_run:
        return
    _supervise_worker(command, {**os.environ, **plan.job_environment()})


@user_errors
def worker(
    pool: Annotated[str, typer.Option("--pool", help="Prefect work pool to serve.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Worker name (default: pgbackflow-HOST).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Flow runs at once on this host.")
    ] = None,
) -> None:
    """Run a Prefect process worker for POOL that stops within 10 s of SIGTERM.

    On SIGTERM/SIGINT it stops taking runs, ends the runs it started (SIGTERM, then SIGKILL
    after 5 s, tools included) and marks them Crashed, so nothing keeps running unwatched.
    """
    from pgbackflow.worker import worker_command

    command = worker_command(pool, name or f"pgbackflow-{os.uname().nodename}", limit)
    _supervise_worker(command, dict(os.environ))


def _supervise_worker(command: list[str], env: dict[str, str]) -> NoReturn:
    """Run the Prefect worker under pgbackflow's supervisor (pgbackflow/worker.py)."""
    from pgbackflow.worker import supervise

    # The worker and its runs get the user's Prefect settings, not those this command set
    # for itself (2 API retries, console and internal logging silenced: the worker's log
    # showed no run it took).
    env = {key: value for key, value in env.items() if not key.startswith("PREFECT_")}
    env.update((k, v) for k, v in ORIGINAL_ENV.items() if k.startswith("PREFECT_"))
    # Each supervisor's flow runs get a daemon of their own (the variable is part of its
    # key): stopping, a supervisor ends every process below it, the daemon included, and
    # must not take another worker's runs with it.
    env["PGBACKFLOW_SUPERVISOR"] = str(os.getpid())
    sys.stdout.flush()
    code = supervise(command, env, say=lambda line: err.print(line, highlight=False))
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing of ours is left to flush; Prefect's exit handlers (its client marked the runs
    # Crashed) took 6 s at load 25, past the 10 s a service manager is promised.
    os._exit(code)


@user_errors
def demo(
    keep: Annotated[
        Path | None, typer.Option("--keep", help="Keep the encrypted backup and key here.")
    ] = None,
    scale: Annotated[float, typer.Option("--scale", help="Sample database size factor.")] = 1.0,
    as_json: AsJson = False,
) -> None:
    """Back up a sample database on a throwaway PostgreSQL 18, restore it, compare every table."""
    from pgbackflow.demo import run_demo

    result = run_demo(keep, scale=scale, say=lambda line: err.print(line, highlight=False))
    render.demo_result(result, keep, as_json)
    if not result.matches:
        raise PgBackflowError("demo: restored row counts differ from the backup")
