"""Where a build's tasks run: this process, a pool of local worker processes, or Ray.

What is sent away is a task whose whole input is files in the output directory: a task
written from its signature's plan (``shared_graphs.write_from_plans``: base weights,
stored graph, masks in the arguments) or an ONNX task specialised from ``DIR/base``
(``build._onnx_task``). Each writes into the task's temporary directory inside the output
directory, and the build process publishes it (manifest, rename, index) under the task's
lock, so a worker never touches shared state. What needs the model in memory stays in the
build process: the first task of each signature in the pt2 format (the graph pass), and
the gguf and pte formats.

With Ray (``--executor ray``, the optional extra ``ray``), the output directory must be
the same path on every node (a shared filesystem: NFS, a cluster's Lustre or GPFS), since
workers read ``DIR/base`` and ``DIR/graphs`` there and write beside them; hard links need
it to be one filesystem. ``ifp_compile`` must be importable on every node (the same
environment, or a Ray ``runtime_env``). Nothing else is shipped: masks go as task arguments
(a few kilobytes), weights never leave the disk.
"""

from __future__ import annotations

from concurrent.futures import Future, ProcessPoolExecutor

from .errors import IFPError

EXECUTORS = ("local", "ray")


class ExecutorError(IFPError):
    """An executor cannot be started (Ray not installed, no cluster at the address)."""


def local_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` worker processes, started fresh (spawn: no inherited locks or threads)."""
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))


class RayExecutor:
    """Build tasks as Ray tasks (one CPU each) on the cluster at ``address`` (``"auto"``: the
    one this machine belongs to), or on a local Ray instance of ``cpus`` CPUs when
    ``address`` is None. ``window`` is how many tasks the build keeps in flight: the cluster's
    CPUs, unless ``--jobs`` says otherwise."""

    def __init__(self, address: str | None, jobs: int):
        try:
            import ray
        except ImportError:
            raise ExecutorError("--executor ray needs Ray: pip install 'ifp-compile[ray]'") from None
        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            try:
                if address is None:
                    ray.init(num_cpus=max(jobs, 1), include_dashboard=False, logging_level="warning",
                             log_to_driver=False)
                else:
                    ray.init(address=address, logging_level="warning", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"at {address}" if address else "on this machine"
                raise ExecutorError(f"could not start or reach a Ray cluster {where}: {e}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = jobs if jobs > 1 else max(cpus, 1)
        self._remote: dict = {}
        self.submitted = 0

    def submit(self, fn, *args) -> Future:
        self.submitted += 1
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=2)(fn)
        return remote.remote(*args).future()

    def shutdown(self, cancel_futures: bool = False) -> None:
        if self._owned:
            self._ray.shutdown()


def make_executor(kind: str, jobs: int, address: str | None = None):
    """The executor for a build: None (tasks run in the build process) for ``local`` with
    one job."""
    if kind == "ray":
        return RayExecutor(address, jobs)
    if kind != "local":
        raise ExecutorError(f"unknown executor {kind!r}; choose from {', '.join(EXECUTORS)}")
    if address is not None:
        raise ExecutorError("--ray-address applies to --executor ray")
    return local_pool(jobs) if jobs > 1 else None
