"""Where the mapped passes run: in this process, a local process pool, or a Dask cluster.

Every executor maps a function over items and yields the results in item order, with a few items per
worker in flight, so the pipeline's decisions never depend on which executor ran or how many workers it
had. Workers receive picklable task records and open every file by path (or URL) themselves; open
rasterio datasets are never sent between processes.

Dask: `DaskExecutor(address)` connects to a running scheduler (`dask scheduler`, `dask worker ADDR`);
without an address it starts a LocalCluster of worker processes with one thread each. A worker that
dies mid-task (killed, out of memory, a crash in a native library) costs only its task: the scheduler
reruns it elsewhere, and because each task writes its outputs under fixed names by rename or single
upload, the rerun leaves the same files. A task that kills ALLOWED_FAILURES + 1 workers fails the run
with a message instead of killing the whole cluster.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Protocol, TypeVar

from . import fs

log = logging.getLogger(__name__)

# Tasks submitted ahead per worker: enough to keep workers busy, few enough to bound memory.
IN_FLIGHT_PER_WORKER = 4
# Finished results held per worker while an earlier, longer task still runs: the other workers go on
# behind it (results still come out in item order), up to this many before they wait for it.
HELD_PER_WORKER = 16
# Thread pools each worker would otherwise size to the whole machine.
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "GDAL_NUM_THREADS": "1",
}
# Workers a single task may take down with it before the run fails (dask's allowed-failures). Enough
# for a preempted node or two; a scene that crashes every worker it lands on stops after four.
ALLOWED_FAILURES = 3
# Seconds to reach a scheduler, and to wait for its first worker.
CONNECT_TIMEOUT = 30
WORKER_TIMEOUT = 120
EXECUTORS = ("local", "dask")

T = TypeVar("T")
R = TypeVar("R")


class ExecutorError(Exception):
    """An executor that cannot run as asked (user-fixable; exit code 2 at the CLI)."""


class _Future(Protocol):
    """What ordered_map needs of a future (concurrent.futures' and distributed's both have it)."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...


F = TypeVar("F", bound=_Future)


def ordered_map(
    submit: Callable[[T], F],
    items: Iterable[T],
    workers: Callable[[], int],
    wait_any: Callable[[list[F]], object],
    cancel: Callable[[list[F]], object],
) -> Iterator[Any]:
    """Results of `submit(item)` in item order, with IN_FLIGHT_PER_WORKER unfinished tasks per worker.

    A task that outlasts the ones after it does not stall the pool: while it runs, later tasks are
    submitted as others finish, and their results are held (HELD_PER_WORKER per worker at most) until
    it is done. Items are consumed lazily; `workers()` is asked again as tasks are submitted (a cluster
    may grow or shrink). The futures not yet yielded are cancelled when the caller stops early.
    """
    window: deque[F] = deque()
    pending = iter(items)
    exhausted = False
    try:
        while True:
            n = workers()
            running = sum(not f.done() for f in window)
            while not exhausted and running < IN_FLIGHT_PER_WORKER * n and len(window) < HELD_PER_WORKER * n:
                item = next(pending, _END)
                if item is _END:
                    exhausted = True
                    break
                window.append(submit(item))  # type: ignore[arg-type]
                running += 1
            if not window:
                return
            if window[0].done():
                yield window.popleft().result()
            elif exhausted or len(window) >= HELD_PER_WORKER * n:
                wait_any([window[0]])  # nothing more to submit: only the oldest matters
            else:
                wait_any([f for f in window if not f.done()])
    finally:
        if window:
            cancel(list(window))


_END = object()


class Executor(Protocol):
    """Maps a function over items and yields the results in item order."""

    @property
    def workers(self) -> int: ...

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]: ...

    def require_visible(self, locations: Sequence[str]) -> None:
        """Raise ExecutorError unless every worker sees these files and folders (paths or URLs)."""
        ...

    def close(self, cancel: bool = False) -> None: ...


class SerialExecutor:
    """Runs everything in this process; what `workers=1` gets."""

    workers = 1

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        return map(fn, items)

    def require_visible(self, locations: Sequence[str]) -> None:
        pass

    def close(self, cancel: bool = False) -> None:
        pass

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _init_worker(environ: dict[str, str] | None = None) -> None:
    """Worker start: the pool's environment (a forked worker would otherwise have the fork server's, as it
    was when the server started: credentials or endpoints set since would be missing), threads pinned."""
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
    os.environ.update(THREAD_ENV)
    if "torch" in sys.modules:  # imported by the parent's __main__ on spawn
        sys.modules["torch"].set_num_threads(1)


# What a worker imports to run the passes' tasks, imported once by the fork server (see ProcessExecutor).
PRELOAD = (
    "rscurate.pipeline",
    "rscurate.scan",
    "rscurate.slicing",
    "rscurate.exclude",
    "rasterio",
    "scipy.ndimage",
)


def default_start_method() -> str:
    """`forkserver` where the platform has it (Linux, macOS), else `spawn`."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class ProcessExecutor:
    """A local process pool. Workers open files by path; no worker inherits an open dataset or a lock.

    The default start method is `forkserver`: a server process, started when the pool is made (so while
    this process lists the files), imports PRELOAD once, and every worker is forked from it with those
    modules loaded, instead of a fresh interpreter importing pandas, pyarrow, rasterio and scipy again
    (about 1.5 s of CPU per worker with `spawn`). The server holds no GDAL dataset and no thread.

    The thread-count variables are set while the pool lives, so each worker process (and the fork
    server) starts with them (BLAS and OpenMP read them at import, before any initializer could run);
    they are restored on close.
    """

    def __init__(
        self, workers: int, start_method: str | None = None, preload: Sequence[str] = PRELOAD
    ) -> None:
        self.workers = workers
        method = start_method or default_start_method()
        context = multiprocessing.get_context(method)
        self._saved = {k: os.environ.get(k) for k in THREAD_ENV}
        os.environ.update(THREAD_ENV)
        if method == "forkserver":
            context.set_forkserver_preload(["__main__", *preload])  # type: ignore[attr-defined]
            from multiprocessing import forkserver

            forkserver.ensure_running()  # imports PRELOAD now, while the parent goes on
            _stop_forkserver_at_exit()
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(dict(os.environ),),
        )

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """Results in item order; items are consumed lazily, at most a few per worker in flight
        (ordered_map)."""
        return ordered_map(
            lambda item: self._pool.submit(fn, item),
            items,
            lambda: self.workers,
            lambda futures: wait(futures, return_when=FIRST_COMPLETED),
            lambda futures: [f.cancel() for f in futures],
        )

    def require_visible(self, locations: Sequence[str]) -> None:
        pass  # the pool's processes share this machine's files

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(cancel=exc_type is not None)


_forkserver_stop_registered = False


def _stop_forkserver_at_exit() -> None:
    """Wait for the fork server when this process exits, rather than leave it to exit on its own: its
    CPU time and its workers' then count in this process's children (getrusage, `time`), as with spawn."""
    global _forkserver_stop_registered
    if _forkserver_stop_registered:
        return
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's own (tests use it); absent: no wait
    if stop is not None:
        atexit.register(stop)
    _forkserver_stop_registered = True


def _missing(locations: Sequence[str]) -> list[str]:
    """Worker side of require_visible."""
    return [loc for loc in locations if not fs.exists(loc)]


class DaskExecutor:
    """Maps over a Dask cluster: the scheduler at `address`, or a LocalCluster of `workers` processes
    (default: cpu_count()) started on first use and closed with the executor.

    Connecting is lazy, so a run with nothing left to do starts no cluster.
    """

    def __init__(
        self, address: str | None = None, workers: int | None = None, allowed_failures: int = ALLOWED_FAILURES
    ) -> None:
        if workers is not None and workers < 1:
            raise ExecutorError(f"--workers must be at least 1, got {workers}")
        if address is not None and workers is not None:
            raise ExecutorError(
                "--workers sizes a local Dask cluster; with --scheduler, start the workers you want"
            )
        self.address = address
        self.allowed_failures = allowed_failures
        self._local_workers = workers
        self._client: Any = None
        self._cluster: Any = None

    @property
    def client(self) -> Any:
        """The distributed.Client, connected (and the LocalCluster started) on first use."""
        if self._client is None:
            self._connect()
        return self._client

    @property
    def workers(self) -> int:
        """Worker threads in the cluster now."""
        info = self.client.scheduler_info()
        return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))

    def _connect(self) -> None:
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise ExecutorError(
                f"--executor dask needs dask and distributed ({exc}); pip install 'dask[distributed]'"
            ) from None
        if self.address is None:
            n = self._local_workers or cpu_count()
            with dask.config.set({"distributed.scheduler.allowed-failures": self.allowed_failures}):
                self._cluster = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    env=dict(THREAD_ENV),  # set before each worker process starts, as BLAS needs
                    dashboard_address=":0",
                    silence_logs=logging.ERROR,
                )
            self._client = Client(self._cluster)
            log.info("dask: local cluster of %d workers, dashboard %s", n, self._client.dashboard_link)
        else:
            try:
                self._client = Client(self.address, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError, ValueError) as exc:
                raise ExecutorError(
                    f"cannot reach the Dask scheduler at {self.address} ({exc}); start one with "
                    "`dask scheduler` and pass the address it prints, e.g. --scheduler tcp://HOST:8786"
                ) from None
            try:
                self._client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
            except TimeoutError:
                self._client.close()
                self._client = None
                raise ExecutorError(
                    f"no worker joined the scheduler at {self.address} within {WORKER_TIMEOUT} s; start "
                    f"some with `dask worker {self.address} --nworkers N --nthreads 1`"
                ) from None
            # The scheduler is this run's: give it the same retry budget a local cluster gets.
            self._client.run_on_scheduler(_set_allowed_failures, self.allowed_failures)
            log.info("dask: scheduler %s with %d worker threads", self.address, self.workers)
        self._client.register_plugin(_thread_env_plugin())

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """Results in item order; at most a few tasks per worker thread submitted ahead (ordered_map)."""
        from distributed import KilledWorker
        from distributed import wait as wait_futures

        client = self.client
        submitted = 0
        workers = self.workers

        def submit(item: T) -> Any:
            nonlocal submitted, workers
            submitted += 1
            if submitted % 64 == 0:
                workers = self.workers  # workers may join or leave
            return client.submit(fn, item, pure=False)

        try:
            yield from ordered_map(
                submit,
                items,
                lambda: workers,
                lambda futures: wait_futures(futures, return_when="FIRST_COMPLETED"),
                client.cancel,
            )
        except KilledWorker as exc:
            raise ExecutorError(
                f"a {getattr(fn, '__name__', 'task')} task took down {self.allowed_failures + 1} Dask "
                f"workers ({exc}); they ran out of memory or crashed in a native library, see the "
                "worker logs. Finished partitions and shards are kept: rerun to resume"
            ) from None

    def require_visible(self, locations: Sequence[str]) -> None:
        """Every worker must see OUT's work folder and the local source roots (a shared filesystem)."""
        locations = list(locations)
        try:
            answers = self.client.run(_missing, locations)
        except ImportError as exc:
            raise ExecutorError(
                f"Dask workers cannot import rscurate ({exc}); install the same environment on every worker"
            ) from None
        bad = {worker: missing for worker, missing in answers.items() if missing}
        if bad:
            worker, missing = sorted(bad.items())[0]
            raise ExecutorError(
                f"{len(bad)} of {len(answers)} Dask workers cannot see {', '.join(missing)} (first: {worker}); "
                "OUT (or --work) and the source folders must be on a filesystem every worker mounts at the "
                "same path, or use URLs (s3://...) that every worker can read"
            )

    def close(self, cancel: bool = False) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(cancel=exc_type is not None)


def _set_allowed_failures(n: int, dask_scheduler: Any = None) -> None:
    dask_scheduler.allowed_failures = n


def _thread_env_plugin() -> Any:
    """A WorkerPlugin (built here: distributed is imported only for --executor dask) that pins thread
    pools on every worker, including workers that join later."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ThreadEnv(WorkerPlugin):  # type: ignore[misc]
        name = "rscurate-thread-env"

        def setup(self, worker: Any) -> None:
            _init_worker()

    return ThreadEnv()


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def make_executor(
    workers: int | None = None, *, kind: str = "local", scheduler: str | None = None
) -> SerialExecutor | ProcessExecutor | DaskExecutor:
    """`local`: a process pool of `workers` (default: cpu_count()), in-process for one worker.
    `dask`: the cluster at `scheduler`, or a LocalCluster of `workers` processes."""
    if kind not in EXECUTORS:
        raise ExecutorError(f"unknown executor {kind!r}; use {' or '.join(EXECUTORS)}")
    if kind == "dask":
        return DaskExecutor(scheduler, workers)
    if scheduler is not None:
        raise ExecutorError("--scheduler needs --executor dask")
    workers = cpu_count() if workers is None else workers
    if workers < 1:
        raise ExecutorError(f"--workers must be at least 1, got {workers}")
    return SerialExecutor() if workers == 1 else ProcessExecutor(workers)
