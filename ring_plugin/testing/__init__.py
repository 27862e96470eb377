"""Helpers for running code in spawned gloo process groups (used by the tests, usable by users)."""

from .spawn import free_port, preload_modules, run_in_process_group

__all__ = ["free_port", "preload_modules", "run_in_process_group"]
