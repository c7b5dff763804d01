"""Deployment definitions (schedules, work pools) for the pgbackflow flows."""
