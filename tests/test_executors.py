"""rscurate.executors: the local pool forks its workers from a server that has the passes' modules loaded."""

from __future__ import annotations

import os
import sys

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
