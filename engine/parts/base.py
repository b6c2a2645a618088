"""The part interface: one class whose hooks a per-job feature overrides (the package docstring lists them)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Hashable

if TYPE_CHECKING:
    from ..execution import ForwardBatch, JobState
    from ..requests import ImageRequest, JobSpec


class Part:
    """A per-job feature; subclasses override the hooks they need (see the module docstring)."""

    name = ""
    backends: frozenset[str] | None = None

    def __init__(self, family: Any, options: Any, spec: Any = None):
        self.family = family
        self.options = options
        self.spec = spec  # the launched model's catalogue entry
        self.wake: Callable[[], None] = lambda: None  # set by the runner: makes its loop look at waiting jobs again

    @classmethod
    def enabled(cls, spec: Any, options: Any) -> bool:
        """Whether a launch of `spec` with `options` can use this part at all."""
        return True

    @classmethod
    def backends_for(cls, options: Any) -> tuple[frozenset[str] | None, str]:
        """The backends a launch with `options` can run this part on (None: all) and the reason for the others;
        read before any weights load. By default `backends`, whatever the options."""
        return cls.backends, ""

    def used_by(self, request: "ImageRequest") -> bool:
        return False

    def check(self, request: "ImageRequest") -> None:
        """Raise InvalidRequest for a request this model cannot run with this part."""

    def admission(self) -> Callable[["JobSpec"], bool] | None:
        """One round of admission (the scheduler's, in queue order): a gate saying whether a waiting job may
        start now. False keeps it waiting (call `wake` once what it waits for is ready); True reserves what the
        job needs until `release`. None: this part never holds a job back."""
        return None

    def release(self, job_id: int) -> None:
        """The job left the executor (finished, failed or dropped), whether or not it used this part; may come
        more than once."""

    def metrics(self) -> tuple[tuple[str, str, float], ...]:
        """Extra /metrics figures: (name, help, value); names ending in _total are counters."""
        return ()

    def lane_key(self, request: "ImageRequest") -> Hashable | None:
        return None

    def encoder_context(self, request: "ImageRequest") -> Hashable | None:
        return None

    def encoding(self, context: Hashable) -> ContextManager[None]:
        """Make the text encoders encode as `context` (from `encoder_context`) asks, for a with-block."""
        return nullcontext()

    def prepare(self, state: "JobState") -> None:
        """Set up the job's data for this part (kept in `state.parts[self.name]`)."""

    def before_forward(self, batch: "ForwardBatch") -> None:
        """Called once per forward that holds rows of jobs using this part."""

    def after_step(self, state: "JobState") -> None:
        """Called after each sampler step of a job using this part."""

    def example_inputs(self, inputs: dict, width: int, height: int) -> list[dict]:
        """Forward inputs with what this part adds (none by default): the graph variants a backend warms up."""
        return []

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for the model's description (GET /v1/models/{uid})."""
        return {}
