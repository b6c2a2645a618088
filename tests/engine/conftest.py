"""Engine fixtures: runners on tiny checkpoints, driven step by step (no thread) so joins happen where a test says."""

from typing import Callable

import numpy as np
import pytest

from kiln.engine.catalogue import get_spec
from kiln.engine.options import parse_launch_options
from kiln.engine.requests import ImageRequest, RequestHandle
from kiln.engine.runner import Runner

# One model per family; the CFG-capable ones where a family has both.
FAMILY_MODELS = {
    "sd": "stable-diffusion-v1.5",
    "sdxl": "stable-diffusion-xl-base-1.0",
    "sd3": "sd3-medium",
    "flux": "FLUX.1-dev",
}
# DESIGN.md's batch-invariance tolerance: max abs pixel difference <= 2/255 in fp32.
PIXEL_TOLERANCE = 2


def make_runner(name: str, start: bool = False, **options) -> Runner:
    spec = get_spec(name)
    runner = Runner(name, spec, parse_launch_options(spec, {"tiny": True, **options}))
    runner.load(start=start)
    return runner


@pytest.fixture(scope="session")
def runner_for(tiny_root) -> Callable[..., Runner]:
    """A stepped (threadless) runner per (model, options), shared by the session."""
    runners: dict[tuple, Runner] = {}

    def get(name: str, **options) -> Runner:
        key = (name, tuple(sorted(options.items())))
        if key not in runners:
            runners[key] = make_runner(name, **options)
        return runners[key]

    yield get
    for runner in runners.values():
        runner.close()


def drive(runner: Runner, until: Callable[[], bool], limit: int = 2000) -> None:
    """Iterate a stepped runner until `until()` holds."""
    for _ in range(limit):
        if until():
            return
        runner.iterate()
    raise AssertionError("the runner did not get there")


def run_alone(runner: Runner, request: ImageRequest) -> RequestHandle:
    handle = runner.submit(request)
    drive(runner, handle.future.done)
    return handle


def pixels(handle: RequestHandle, index: int = 0) -> np.ndarray:
    return np.asarray(handle.result()[index].image, dtype=np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a - b).max())
