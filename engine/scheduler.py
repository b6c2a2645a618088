"""Kiln's request scheduler: which jobs run together at each step. Pure Python, no tensors.

The runner's loop has three beats, as in vLLM's engine core:
    plan = scheduler.schedule()      # who is admitted, which lane steps, who left
    runner.execute(plan)             # all tensor work
    scheduler.update(plan)           # finished and failed jobs leave their lane
`add` (from any thread) and cancellation through the request handle are the only other doors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .requests import Job
from .errors import QueueFull


@dataclass
class StepPlan:
    """What one iteration of the loop does."""

    admitted: list[Job] = field(default_factory=list)  # to encode and initialise before the step
    lane: tuple | None = None
    jobs: list[Job] = field(default_factory=list)  # the lane's jobs that step now (admitted ones included)
    dropped: list[Job] = field(default_factory=list)  # left because their request was cancelled or failed


class Scheduler:
    """FCFS admission into lanes, bounded by `max_batch_size` active jobs; lanes step in round-robin."""

    def __init__(self, max_batch_size: int, max_queue_size: int):
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self._waiting: deque[Job] = deque()
        self._lanes: OrderedDict[tuple, list[Job]] = OrderedDict()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)

    def add(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none: past the queue bound the request is refused with QueueFull."""
        with self._lock:
            if len(self._waiting) + len(jobs) > self.max_queue_size:
                raise QueueFull(
                    f"queue full: {len(self._waiting)} images waiting (bound {self.max_queue_size}); retry later"
                )
            self._waiting.extend(jobs)
            self._work.notify()

    def wake(self) -> None:
        """Make a waiting loop look again (after a cancellation or at shutdown)."""
        with self._lock:
            self._work.notify()

    def wait_for_work(self, timeout: float) -> bool:
        with self._lock:
            return self._work.wait_for(self._has_work, timeout)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return sum(len(jobs) for jobs in self._lanes.values())

    def schedule(self) -> StepPlan:
        """Drop jobs whose request ended, admit waiting jobs up to the batch bound, and pick the next lane."""
        with self._lock:
            plan = StepPlan(dropped=self._drop_ended())
            active = self.active_count
            while self._waiting and active < self.max_batch_size:
                job = self._waiting.popleft()
                self._lanes.setdefault(job.lane, []).append(job)
                plan.admitted.append(job)
                active += 1
            if self._lanes:
                lane, jobs = next(iter(self._lanes.items()))
                self._lanes.move_to_end(lane)  # round-robin: this lane goes to the back of the line
                plan.lane, plan.jobs = lane, list(jobs)
            return plan

    def update(self, plan: StepPlan) -> None:
        """Finished jobs, and jobs whose request failed during the step, leave their lane."""
        with self._lock:
            jobs = self._lanes.get(plan.lane)
            if jobs is not None:
                jobs[:] = [job for job in jobs if not (job.finished or job.handle.future.done())]
                if not jobs:
                    del self._lanes[plan.lane]

    def _has_work(self) -> bool:
        return bool(self._waiting or self._lanes)

    def _drop_ended(self) -> list[Job]:
        def ended(job: Job) -> bool:
            return job.handle.cancelled or job.handle.future.done()

        dropped = [job for job in self._waiting if ended(job)]
        if dropped:
            self._waiting = deque(job for job in self._waiting if not ended(job))
        for lane in list(self._lanes):
            jobs = self._lanes[lane]
            dropped += [job for job in jobs if ended(job)]
            jobs[:] = [job for job in jobs if not ended(job)]
            if not jobs:
                del self._lanes[lane]
        return dropped
