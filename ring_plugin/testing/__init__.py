"""Helpers for running code in spawned gloo process groups (used by the tests, usable by users)."""

from .spawn import free_port, run_in_process_group

__all__ = ["free_port", "run_in_process_group"]
