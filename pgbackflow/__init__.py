"""pgbackflow: PostgreSQL backups, PITR and restore verification on Prefect 3."""

__version__ = "0.1.0"
