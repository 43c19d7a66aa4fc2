"""Where `dsc matrix` runs its tasks: local worker processes, or Ray tasks on an existing cluster.

Both take the same task (`dsc.matrix.tasks.run_task(kind, payload)`) with the host memory it
is predicted to need, and hand back its result dict. Neither is a scheduler of its own: the
local one is a `ProcessPoolExecutor` (spawned processes, sized to the host's cores and free
memory), the Ray one asks Ray for `memory=` and, for a compile that needs the device, a custom
resource named after the SM (`SM90`, `SM87`); Ray places and retries the task.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from dsc.errors import EnvironmentFailure, UsageError
from dsc.matrix.tasks import run_task

RETRIES = 2  # a task whose worker died is run again this many times


class WorkerDied(Exception):
    """The process running a task died (killed, OOM): the task may be retried."""


def available_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dev dependency
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class LocalExecutor:
    """Worker processes on this host: as many as cores, and as the free memory admits."""

    name = "local"

    def __init__(self, workers: int | None = None, memory: int | None = None):
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.workers = workers or max(1, self.cores)
        self.memory = memory or available_memory()
        self._pool: ProcessPoolExecutor | None = None
        self.in_use = 0

    def describe(self) -> str:
        return f"local: {self.workers} worker processes, {self.memory / 2**30:.1f} GiB free"

    def device_resources(self) -> set[str]:
        return set()

    def admits(self, memory: int, running: int) -> bool:
        """Start another task only if cores and memory allow (one always runs)."""
        return running == 0 or (running < self.workers and self.in_use + memory <= self.memory)

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            # spawn: the workers import torch/onnx themselves (forking a process that holds
            # them is unsafe).
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self._pool

    def submit(self, kind: str, payload: dict, memory: int, resources: dict) -> Future:
        fut = self._get_pool().submit(run_task, kind, payload)
        fut.memory = memory  # type: ignore[attr-defined]
        self.in_use += memory
        return fut

    def wait(self, handles: list) -> list:
        finished, _ = wait(handles, return_when=FIRST_COMPLETED)
        return list(finished)

    def result(self, handle: Future) -> dict:
        self.in_use -= getattr(handle, "memory", 0)
        try:
            return handle.result()
        except BrokenProcessPool:
            # Every task of a broken pool fails; a fresh pool runs the retries.
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            raise WorkerDied("a worker process died") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class RayExecutor:
    """Ray tasks on an existing cluster (`address`, else RAY_ADDRESS): Ray places them by the
    memory each asks for, and retries a task whose worker died (`max_retries`)."""

    name = "ray"

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError(
                '--executor ray needs Ray: pip install "dsc[ray]" (or use --executor local)'
            ) from None
        self.ray = ray
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise UsageError(
                "--executor ray submits to an existing cluster: give --address HOST:PORT or "
                "set RAY_ADDRESS (`ray start --head` starts a one-host cluster)"
            )
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        except Exception as e:  # noqa: BLE001 - ray raises ConnectionError and others
            raise EnvironmentFailure(
                f"cannot reach the Ray cluster at {address}: {' '.join(str(e).split())[:200]}"
            ) from None
        self.address = address
        self._remote = ray.remote(run_task)
        self.resources = ray.cluster_resources()

    def describe(self) -> str:
        r = self.resources
        return (
            f"ray at {self.address}: {r.get('CPU', 0):g} CPUs, "
            f"{r.get('memory', 0) / 2**30:.1f} GiB for tasks"
        )

    def device_resources(self) -> set[str]:
        return {k for k in self.resources if k.startswith("SM")}

    def admits(self, memory: int, running: int) -> bool:
        return True  # Ray queues what does not fit

    def submit(self, kind: str, payload: dict, memory: int, resources: dict):
        cap = int(self.resources.get("memory", memory))
        opts = {
            "num_cpus": 1,
            # Never ask for more than the whole cluster has: the task would never be placed.
            "memory": min(memory, cap),
            "max_retries": RETRIES + 1,
            "retry_exceptions": False,
        }
        if resources:
            opts["resources"] = resources
        return self._remote.options(**opts).remote(kind, payload)

    def wait(self, handles: list) -> list:
        ready, _ = self.ray.wait(handles, num_returns=1)
        return ready

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayError as e:
            return {"ok": False, "error": f"ray: {' '.join(str(e).split())[:300]}"}

    def close(self) -> None:
        self.ray.shutdown()
