"""``python -m pgbackflow.cli`` (the PITR redo script and the benchmarks run it so)."""

from pgbackflow.cli import main

main()
