"""Prefect flows: each reads like the runbook it automates."""
