"""Real ranks for tests: worker processes that share one gloo process group.

A :class:`RankPool` of ``world_size`` processes is spawned once (per world size and test
session) and serves every test: :meth:`RankPool.run` sends a module-level function of a
test module to every rank (the workers find it again by file path and name), runs it
there with the process group initialised, and returns each rank's result. The process
group uses a file store in a temporary directory and gloo bound to the loopback
interface, so nothing listens beyond this machine.

A rank that raises, dies or hangs fails the call with every rank's traceback, and the
pool is shut down: collectives left half-done would desynchronise the next test, so the
next call starts a fresh pool.
"""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from types import ModuleType
from typing import Any

CALL_TIMEOUT_S = 180.0
"""Longest a test function may run on the ranks."""
GRACE_S = 5.0
"""How long the other ranks get to finish once one rank failed (they may be stuck in a collective)."""
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"


def _load(path: str, cache: dict[str, ModuleType]) -> ModuleType:
    if path not in cache:
        name = f"rank_case_{len(cache)}_{os.path.splitext(os.path.basename(path))[0]}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        cache[path] = module
    return cache[path]


def _serve(rank: int, world_size: int, store: str, conn: Connection) -> None:
    """A worker: join the process group, then run what the parent sends until it sends None."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # world_size ranks share this machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    modules: dict[str, ModuleType] = {}
    try:
        while (message := conn.recv()) is not None:
            path, name, args = message
            try:
                conn.send((True, getattr(_load(path, modules), name)(*args)))
            except BaseException:  # noqa: BLE001 - every failure goes back to the test
                conn.send((False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class RankPool:
    """``world_size`` processes in one gloo process group, ready to run test functions."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        context = multiprocessing.get_context("spawn")
        self._store = tempfile.TemporaryDirectory(prefix="fused-sgd-ranks-")
        store = os.path.join(self._store.name, "store")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(target=_serve, args=(rank, world_size, store, child), daemon=True)
            process.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(process)

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(process.is_alive() for process in self._procs)

    def run(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        """``function(*args)`` on every rank; the list of their return values, by rank.

        ``function`` must be a module-level function of a test module (not a lambda or a
        closure); ``args`` and the return values must pickle.
        """
        if not self.alive:
            raise RuntimeError(f"the {self.world_size}-rank pool is shut down")
        path, name = inspect.getfile(function), function.__name__
        for conn in self._conns:
            conn.send((path, name, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + CALL_TIMEOUT_S
        pending = dict(enumerate(self._conns))
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for conn in wait(list(pending.values()), timeout=remaining):
                rank = next(r for r, c in pending.items() if c is conn)
                del pending[rank]
                try:
                    outcomes[rank] = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    outcomes[rank] = (False, f"rank {rank} died (exit code {self._procs[rank].exitcode})")
                if not outcomes[rank][0]:
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        if pending or not all(ok for ok, _ in outcomes.values()):
            self.close()
            report = []
            for rank in range(self.world_size):
                ok, value = outcomes.get(rank, (False, "no answer (stuck in a collective, or too slow)"))
                if not ok:
                    report.append(f"--- rank {rank} of {self.world_size} ---\n{value}")
            raise AssertionError(f"{name} failed on some ranks:\n" + "\n".join(report))
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        """Stop the workers: politely if they listen, by force if they do not."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self._procs:
            process.join(timeout=GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self._store.cleanup()


class RankPools:
    """One live pool per world size, started on first use and restarted after a failure."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def get(self, world_size: int) -> RankPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = RankPool(world_size)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            if pool.alive:
                pool.close()
        self._pools.clear()
