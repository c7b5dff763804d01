"""The verification agent's resource budget and how it is shared between jobs.

An agent is given CPUs, memory, disk and a wish for concurrent jobs. Every job needs at
least 1 CPU and 512 MB; when the budget cannot cover the wish, the agent takes fewer jobs
at once (and says so) instead of failing. Each job's sandbox gets an equal share.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pgbackflow.tasks.errors import ConfigError
from pgbackflow.tasks.sandbox import SandboxResources

MIN_CPU_PER_JOB = 1.0
MIN_MEMORY_MB_PER_JOB = 512

#: Environment through which an agent hands each job its share (read by the flows).
ENV_CPUS = "PGBACKFLOW_SANDBOX_CPUS"
ENV_MEMORY_MB = "PGBACKFLOW_SANDBOX_MEMORY_MB"
ENV_MAX_DISK_BYTES = "PGBACKFLOW_MAX_DISK_BYTES"


@dataclass(frozen=True)
class BudgetPlan:
    """What an agent advertises and what each job gets.

    Attributes:
        concurrent_jobs: Jobs the agent runs at once.
        per_job: CPU and memory of each job's sandbox.
        disk_bytes: Disk the agent may use (checked before each job).
        note: Why fewer jobs than requested are advertised, if so.
    """

    concurrent_jobs: int
    per_job: SandboxResources
    disk_bytes: int
    note: str | None = None

    def job_environment(self) -> dict[str, str]:
        """Variables that pass each job its share."""
        return {
            ENV_CPUS: f"{self.per_job.cpus:g}",
            ENV_MEMORY_MB: str(self.per_job.memory_mb),
            ENV_MAX_DISK_BYTES: str(self.disk_bytes),
        }


def plan_budget(
    max_cpu: float, max_ram_mb: int, max_disk_gb: float, max_concurrent_jobs: int
) -> BudgetPlan:
    """Share a budget between concurrent jobs, respecting the per-job floor.

    Raises:
        ConfigError: the budget cannot run even one job, or a value is not positive.
    """
    for name, value in (("--max-cpu", max_cpu), ("--max-ram-mb", max_ram_mb),
                        ("--max-disk-gb", max_disk_gb),
                        ("--max-concurrent-jobs", max_concurrent_jobs)):
        if value <= 0:
            raise ConfigError(f"{name} {value} must be positive")
    affordable = min(
        max_concurrent_jobs,
        math.floor(max_cpu / MIN_CPU_PER_JOB),
        max_ram_mb // MIN_MEMORY_MB_PER_JOB,
    )
    if affordable < 1:
        raise ConfigError(
            f"budget of {max_cpu:g} CPU and {max_ram_mb} MB cannot run one verification: each "
            f"needs at least {MIN_CPU_PER_JOB:g} CPU and {MIN_MEMORY_MB_PER_JOB} MB"
        )
    note = None
    if affordable < max_concurrent_jobs:
        note = (
            f"advertising {affordable} concurrent job{'s' if affordable > 1 else ''} instead of "
            f"{max_concurrent_jobs}: {max_cpu:g} CPU and {max_ram_mb} MB cover {affordable} at "
            f"{MIN_CPU_PER_JOB:g} CPU and {MIN_MEMORY_MB_PER_JOB} MB each"
        )
    return BudgetPlan(
        concurrent_jobs=affordable,
        per_job=SandboxResources(
            cpus=round(max_cpu / affordable, 2), memory_mb=max_ram_mb // affordable
        ),
        disk_bytes=int(max_disk_gb * 1024**3),
        note=note,
    )


def job_share_from_environment(default: SandboxResources) -> SandboxResources:
    """The share an agent passed to this job, else ``default``."""
    cpus = os.environ.get(ENV_CPUS)
    memory = os.environ.get(ENV_MEMORY_MB)
    return SandboxResources(
        cpus=float(cpus) if cpus else default.cpus,
        memory_mb=int(memory) if memory else default.memory_mb,
        pids=default.pids,
    )


def disk_budget_from_environment() -> int | None:
    """The agent's disk budget in bytes, if this job runs under an agent."""
    value = os.environ.get(ENV_MAX_DISK_BYTES)
    return int(value) if value else None
