"""rscurate.executors: the local pool forks its workers from a server that has the passes' modules loaded."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import pytest

from rscurate import executors


def loaded(name: str) -> tuple[bool, str | None]:
    return name in sys.modules, os.environ.get("OPENBLAS_NUM_THREADS")


@pytest.mark.skipif(executors.default_start_method() != "forkserver", reason="no forkserver on this platform")
def test_workers_start_with_the_passes_modules_loaded() -> None:
    with executors.ProcessExecutor(2) as ex:
        # Forked from the server: the heavy modules are there before any task imported them.
        assert list(ex.map(loaded, ["rscurate.slicing", "pandas", "rasterio"])) == [(True, "1")] * 3
        assert list(ex.map(abs, range(-50, 0))) == list(range(50, 0, -1))  # results in item order


def test_spawn_still_works() -> None:
    with executors.ProcessExecutor(2, start_method="spawn") as ex:
        assert list(ex.map(abs, [-3, -1, -2])) == [3, 1, 2]


def env_of(name: str) -> str | None:
    return os.environ.get(name)


def test_workers_see_the_environment_of_their_pool_not_of_the_fork_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with executors.ProcessExecutor(2) as ex:  # the fork server is running from here on
        assert list(ex.map(env_of, ["RSCURATE_TEST_ENDPOINT"])) == [None]
    monkeypatch.setenv("RSCURATE_TEST_ENDPOINT", "http://127.0.0.1:9")  # set after the server started
    with executors.ProcessExecutor(2) as ex:
        assert list(ex.map(env_of, ["RSCURATE_TEST_ENDPOINT"] * 3)) == ["http://127.0.0.1:9"] * 3


def _thread_map(
    pool: ThreadPoolExecutor, fn: Callable[[int], object], items: list[int], workers: int
) -> list[object]:
    return list(
        executors.ordered_map(
            lambda item: pool.submit(fn, item),
            items,
            lambda: workers,
            lambda futures: wait(futures, return_when=FIRST_COMPLETED),
            lambda futures: [f.cancel() for f in futures],
        )
    )


def test_a_long_first_task_does_not_stall_the_tasks_behind_it() -> None:
    # Task 0 finishes only once task 30 has run: 30 is past the tasks in flight at the start
    # (IN_FLIGHT_PER_WORKER per worker), so it runs only if the map keeps submitting behind task 0.
    later = 30
    assert later >= executors.IN_FLIGHT_PER_WORKER * 2
    reached = threading.Event()

    def task(i: int) -> object:
        if i == 0:
            return reached.wait(timeout=60)  # False: the map waited on task 0 and never got to 30
        if i == later:
            reached.set()
        return i

    with ThreadPoolExecutor(2) as pool:
        results = _thread_map(pool, task, list(range(40)), workers=2)
    assert results == [True, *range(1, 40)]  # and still in item order


def test_ordered_map_bounds_what_it_holds_and_cancels_on_early_exit() -> None:
    cap = executors.HELD_PER_WORKER * 2
    submitted: list[int] = []
    release = threading.Event()

    def task(i: int) -> int:
        if i == 0:
            release.wait(timeout=60)
        return i

    with ThreadPoolExecutor(2) as pool:

        def submit(item: int) -> Future[int]:
            submitted.append(item)
            return pool.submit(task, item)

        def wait_any(futures: list[Future[int]]) -> None:
            if len(submitted) >= cap:  # the map has stopped submitting behind task 0: let it finish
                release.set()
            wait(futures, return_when=FIRST_COMPLETED)

        mapped = executors.ordered_map(
            submit, range(1000), lambda: 2, wait_any, lambda futures: [f.cancel() for f in futures]
        )
        assert next(mapped) == 0
        assert len(submitted) == cap  # held results while task 0 ran: HELD_PER_WORKER per worker
        assert next(mapped) == 1
        mapped.close()
    assert len(submitted) < 1000
