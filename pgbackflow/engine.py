"""``python -m pgbackflow.engine``: the flow-run command of pgbackflow's work pools.

Prefect's process worker starts one process per flow run; ``python -m prefect.engine``
imports Prefect and the flows first (~2-3 s here, every run). This runs the same engine in a
warm daemon (see :mod:`pgbackflow.launcher`), or exactly that command when none is up.
"""

from pgbackflow.launcher import run_flow_run

if __name__ == "__main__":
    run_flow_run()
