"""An idle thread gives its OpenMP workers back (engine/openmp.py): libgomp throttles every pool's spin-wait once
the process holds more workers than CPUs, so a pool left behind by a loader or an idle model slows the others."""

import functools
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kiln.engine.openmp import _libgomp, release_thread_pool

pytestmark = pytest.mark.skipif(_libgomp() is None, reason="torch does not run on libgomp here")
CHILD = "KILN_OPENMP_TEST_CHILD"


def in_a_fresh_process(test):
    """Run the test in its own pytest process: it counts the process's threads, which other tests' servers and
    pools would change under it."""
    if os.environ.get(CHILD):
        return test

    @functools.wraps(test)
    def spawn(**_):
        node = f"{__file__}::{test.__name__}"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
                              env={**os.environ, CHILD: "1"}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:]

    spawn.__signature__ = __import__("inspect").Signature()  # no fixtures in the parent
    return spawn


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def two_torch_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest runs tests on one thread, which starts no OpenMP workers at all
    yield
    torch.set_num_threads(saved)


def _parallel_op() -> None:
    torch.nn.functional.silu(torch.ones(512, 1024))  # above ATen's grain size: a parallel region


@in_a_fresh_process
def test_a_thread_that_ran_a_parallel_op_keeps_a_worker_until_it_releases_it(two_torch_threads):
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()
        before = _threads()
        pool.submit(_parallel_op).result()
        assert _threads() == before + 1  # the pool thread's own OpenMP worker, alive while the thread lives
        assert pool.submit(release_thread_pool).result()
        assert _threads() == before
        pool.submit(_parallel_op).result()  # the next region builds a new pool and computes as before
        assert _threads() == before + 1


def _generate(runner) -> None:
    from kiln.engine.requests import ImageRequest

    request = ImageRequest(prompt="a cat", width=64, height=64, steps=2, guidance_scale=7.5)
    runner.submit(request).future.result(timeout=120)


def _settles_at(count: int) -> bool:
    """Whether the process's thread count comes down to `count` within 5 s (a runner releases after 0.5 s)."""
    waiting = threading.Event()
    for _ in range(50):
        if _threads() == count:
            return True
        waiting.wait(0.1)
    return _threads() == count


@in_a_fresh_process
def test_an_idle_runner_and_its_loader_hold_no_openmp_workers(two_torch_threads):
    from kiln.engine.catalogue import get_spec
    from kiln.engine.options import parse_launch_options
    from kiln.engine.runner import Runner

    spec = get_spec("stable-diffusion-v1.5")
    options = parse_launch_options(spec, {"tiny": True, "backend": "eager"})
    with ThreadPoolExecutor(1) as loader:  # as the server does: the loading thread lives on
        first = Runner("first", spec, options)
        loader.submit(first.load).result()
        _generate(first)  # libraries start their own threads (tokenizers, BLAS) once, on first use
        first.close()
        threading.Event().wait(0.3)  # a joined thread's OS thread ends a moment after join returns
        before = _threads()
        flux = get_spec("FLUX.1-schnell")  # its 8-bit T5's probe forward at load runs parallel regions
        idle = Runner("flux", flux, parse_launch_options(flux, {"tiny": True, "backend": "eager"}))
        loader.submit(idle.load).result()
        runner = Runner("sd", spec, options)
        loader.submit(runner.load).result()
        try:
            assert _threads() == before + 2  # the two scheduler threads, and no OpenMP worker of the loader
            _generate(runner)
            assert _settles_at(before + 2)  # idle again: the scheduler's own workers are gone too
        finally:
            runner.close()
            idle.close()
