"""Run a function on ``world_size`` spawned CPU processes joined in a gloo group, with a timeout.

Each rank calls ``fn(rank, world_size, *args)``; the return values come back as a list indexed by
rank. An exception on any rank, or a rank that does not finish within ``timeout`` seconds, raises
in the caller (and the remaining processes are killed), so a bug fails instead of hanging.

``reuse=True`` runs ``fn`` in a world kept from an earlier call of the same size (started on first use):
process start-up and imports (torch, Lightning: seconds per process) are paid once per world instead of
once per call. Each call starts with the environment variables the world started with and a random torch
seed, as a fresh process would; a world whose call failed or timed out is discarded (its ring may
be mid-message), and so is one whose ``fn`` destroyed the process group. Use fresh worlds (the default)
for functions that leave the ring unusable on purpose.

Processes are forked from multiprocessing's fork server, which imports torch and ``ring_plugin`` once (and
whatever :func:`preload_modules` adds) instead of a fresh interpreter importing them per process; each starts
from a random torch seed, as a new process would.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "ring_plugin"]


def preload_modules(*names: str) -> None:
    """Modules the fork server imports before it forks the first process (Lightning, say, for worlds that
    train): call before the first world starts; later calls change nothing in a running server."""
    _PRELOAD.extend(n for n in names if n not in _PRELOAD)


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


def free_port() -> int:
    """A TCP port on localhost that is free now (for a rendezvous of spawned processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world_size: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    import torch
    import torch.distributed as dist

    try:
        _join_group(rank, world_size, port)
        torch.seed()  # forked from the fork server: its seed, unless drawn anew
        result = fn(rank, world_size, *args)
        queue.put((0, rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((0, rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reused_worker(rank: int, world_size: int, port: int, tasks, queue) -> None:
    """Joins the group once, then runs ``(call_id, fn, args)`` tasks until ``None`` or a failed one."""
    import torch
    import torch.distributed as dist

    try:
        _join_group(rank, world_size, port)
    except BaseException:  # noqa: BLE001
        queue.put((None, rank, False, traceback.format_exc()))
        return
    environ = dict(os.environ)
    try:
        while (task := tasks.get()) is not None:
            call_id, fn, args = task
            os.environ.clear()
            os.environ.update(environ)
            torch.seed()  # a new process starts from a random seed: no call depends on an earlier one's draws
            torch.set_num_threads(1)
            try:
                queue.put((call_id, rank, True, fn(rank, world_size, *args)))
            except BaseException:  # noqa: BLE001
                queue.put((call_id, rank, False, traceback.format_exc()))
                return
            if not dist.is_initialized():
                return
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _World:
    """Processes of one reused world: a task queue per rank and one result queue."""

    def __init__(self, world_size: int) -> None:
        ctx = _context()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_reused_worker, args=(r, world_size, port, self.tasks[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, wait: float = 5.0) -> None:
        for tasks, p in zip(self.tasks, self.procs):
            if p.is_alive():
                tasks.put(None)
        for p in self.procs:
            p.join(timeout=wait)
            if p.is_alive():
                p.kill()


_WORLDS: dict[int, _World] = {}
_CALL_IDS = itertools.count(1)


@atexit.register
def close_reused_worlds() -> None:
    """Ends the worlds kept by ``reuse=True`` calls."""
    while _WORLDS:
        _WORLDS.popitem()[1].close()


def _collect(results, call_id: int, world_size: int, timeout: float, procs: list) -> tuple[dict[int, Any], list[str]]:
    """Results of call ``call_id`` by rank, and the failures; stops at ``timeout`` or 20 s after a failure (the
    other ranks may wait on the failed one), or when a rank's process died without an answer."""
    done: dict[int, Any] = {}
    errors: list[str] = []
    failed: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(done) + len(failed) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if errors:
                break
            raise TimeoutError(f"{world_size - len(done)} rank(s) did not finish within {timeout:.0f} s")
        try:
            got_id, rank, ok, payload = results.get(timeout=min(remaining, 1.0))
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in done and r not in failed and not p.is_alive()]
            if dead and results.empty():
                failed.update(dead)
                errors += [f"rank {r}: its process ended (exit code {procs[r].exitcode}) without a result"
                           for r in dead]
                deadline = min(deadline, time.monotonic() + 20.0)
            continue
        if got_id not in (call_id, None):
            continue  # a late answer to an earlier call
        if ok:
            done[rank] = payload
        else:
            failed.add(rank)
            errors.append(f"rank {rank}:\n{payload}")
            deadline = min(deadline, time.monotonic() + 20.0)
    return done, errors


def run_in_process_group(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
                         reuse: bool = False) -> list[Any]:
    if reuse:
        world = _WORLDS.get(world_size)
        if world is None or not world.alive():
            if world is not None:
                world.close()
            world = _WORLDS[world_size] = _World(world_size)
        call_id = next(_CALL_IDS)
        for tasks in world.tasks:
            tasks.put((call_id, fn, args))
        procs, results = world.procs, world.results
    else:
        ctx = _context()
        results = ctx.Queue()
        port, call_id = free_port(), 0
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
    ok = False
    try:
        done, errors = _collect(results, call_id, world_size, timeout, procs)
        ok = not errors
    finally:
        if not reuse:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        elif not ok:
            _WORLDS.pop(world_size).close(wait=0.5)
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [done[r] for r in range(world_size)]
