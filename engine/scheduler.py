"""Kiln's request scheduler: which jobs run together at each step. Pure Python, no tensors.

The runner's loop has three beats, vLLM's contract, with plain data between them:

    plan = scheduler.schedule()             # StepPlan: who is admitted, which lane steps, who is decoded/dropped
    result = executor.execute(plan)         # StepResult: steps done, images, failures, previews, timings
    events = scheduler.update(plan, result) # the only writer of job progress; Progress/Preview/Finished/Failed

`add` and `abort` (from any thread) are the only other doors: a new request's jobs join the waiting queue; an
abort takes the request's jobs out of the queue and the lanes at once (so the queue bound and the counts are
right the moment a client is told its request was aborted), and the executor learns of them at one point, the
next plan's `dropped`. A plan carries the full data of the jobs it admits and ids for the rest, so it can cross
a process boundary.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import QueueFull, RequestAborted
from .requests import JobSpec, LaneKey


@dataclass(frozen=True)
class StepPlan:
    """What one iteration does. `step` are the lane's jobs that take a denoising step (admitted ones included);
    `decode` the jobs whose last step ran in the previous iteration; `dropped` the jobs whose request ended
    (aborted, or failed elsewhere) and whose state the executor frees."""

    admitted: tuple[JobSpec, ...] = ()
    lane: LaneKey | None = None
    step: tuple[int, ...] = ()
    decode: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()

    @property
    def idle(self) -> bool:
        return not (self.admitted or self.step or self.decode or self.dropped)


@dataclass(frozen=True)
class Call:
    """One batched component call the executor made: prompt encoding, denoiser forward, VAE decode."""

    component: str  # "encode", "forward" or "decode"
    items: int  # texts encoded, rows forwarded, images decoded
    seconds: float
    width: int = 0
    height: int = 0


@dataclass
class StepResult:
    """What the executor did with a plan. Jobs it stepped have one more step done; admitted jobs report how many
    steps they will take; failed jobs fail their whole request."""

    admitted: dict[int, int] = field(default_factory=dict)  # job id -> total steps
    stepped: list[int] = field(default_factory=list)
    images: dict[int, Any] = field(default_factory=dict)  # job id -> decoded image
    failed: dict[int, BaseException] = field(default_factory=dict)
    previews: list[tuple[int, int, Any]] = field(default_factory=list)  # (job id, preview number, image)
    seconds: dict[str, float] = field(default_factory=dict)  # "admit", "step", "decode" -> time spent
    step_started: float | None = None  # time.monotonic() when the lane's step began
    calls: list[Call] = field(default_factory=list)


# Events name jobs by id (never by request id, which a client may reuse once its request has ended).
@dataclass(frozen=True)
class Progress:
    job_id: int
    done: int
    total: int


@dataclass(frozen=True)
class Preview:
    job_id: int
    number: int
    image: Any


@dataclass(frozen=True)
class Finished:
    job_id: int
    image: Any


@dataclass(frozen=True)
class Failed:
    """The job's request failed as a whole (one event per request, naming one of its jobs)."""

    job_id: int
    error: BaseException


Event = Progress | Preview | Finished | Failed
# One round of admission: called once per schedule(), it returns the gate asked about each waiting job in queue
# order (False: the job keeps waiting, e.g. until its LoRA is resident), or None to admit as usual.
Admission = Callable[[], Callable[[JobSpec], bool] | None]


@dataclass(eq=False)
class _Record:
    job: JobSpec
    total: int = 0
    done: int = 0
    admitted: bool = False


class Scheduler:
    """FCFS admission into lanes, bounded by `max_batch_size` active jobs; lanes step in round-robin; a job
    whose last step ran is decoded at the next iteration (and no longer counts as active).

    `admission` (optional) may hold waiting jobs back; the others pass them in queue order. While held-back jobs
    are all that waits, the queue alone does not wake the loop: `add`, `abort`, `wake` and any job leaving do."""

    def __init__(self, max_batch_size: int, max_queue_size: int, admission: Admission | None = None):
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.admission = admission
        self._held = False  # the last round held every job still waiting back
        self._waiting: deque[_Record] = deque()
        self._lanes: OrderedDict[LaneKey, list[_Record]] = OrderedDict()
        self._finished: list[_Record] = []
        self._records: dict[int, _Record] = {}
        self._ended: list[Failed] = []  # requests to report as failed at the next update
        self._to_free: list[int] = []  # admitted jobs of ended requests, for the next plan's `dropped`
        self._active = 0
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)

    # --- the doors (any thread) --------------------------------------------------------------------------
    def add(self, jobs: list[JobSpec]) -> None:
        """Queue a request's jobs, all or none: past the queue bound the request is refused with QueueFull."""
        with self._lock:
            if len(self._waiting) + len(jobs) > self.max_queue_size:
                raise QueueFull(
                    f"queue full: {len(self._waiting)} images waiting (bound {self.max_queue_size}); retry later"
                )
            for job in jobs:
                record = _Record(job)
                self._records[job.id] = record
                self._waiting.append(record)
            self._held = False
            self._work.notify()

    def abort(self, request_id: str) -> None:
        """Take the request's jobs out now; the next plan drops the admitted ones' state."""
        with self._lock:
            self._end(request_id, RequestAborted(f"The request has been cancelled: {request_id}"))
            self._held = False
            self._work.notify()

    def wake(self) -> None:
        """Make a waiting loop look again (at shutdown, or once what a held-back job waits for is ready)."""
        with self._lock:
            self._held = False
            self._work.notify()

    def wait_for_work(self, timeout: float) -> bool:
        with self._lock:
            return self._work.wait_for(self._has_work, timeout)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        """Jobs admitted and not yet finished, and ended ones whose state the executor still holds (a step under
        way may be computing them). Kept as counts, never by walking the lanes, which change under the lock."""
        return self._active + len(self._to_free)

    # --- the loop (the runner's thread) ------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Hand over the finished jobs to decode and the ended ones to drop, admit waiting jobs up to the batch
        bound, and pick the next lane."""
        with self._lock:
            decode = tuple(record.job.id for record in self._finished)
            admitted = []
            gate = self.admission() if self.admission is not None else None
            held: list[_Record] = []
            while self._waiting and self._active < self.max_batch_size:
                record = self._waiting.popleft()
                if gate is not None and not gate(record.job):
                    held.append(record)
                    continue
                record.admitted = True
                self._lanes.setdefault(record.job.lane, []).append(record)
                admitted.append(record.job)
                self._active += 1
            self._waiting.extendleft(reversed(held))
            self._held = bool(held) and len(held) == len(self._waiting)
            lane, stepping = None, ()
            if self._lanes:
                lane, records = next(iter(self._lanes.items()))
                self._lanes.move_to_end(lane)  # round-robin: this lane goes to the back of the line
                stepping = tuple(record.job.id for record in records)
            dropped, self._to_free = tuple(self._to_free), []
            return StepPlan(tuple(admitted), lane, stepping, decode, dropped)

    def update(self, plan: StepPlan, result: StepResult) -> list[Event]:
        """Apply what the executor did: progress, finished jobs (to decode next), decoded images, failures (the
        whole request leaves); return the events for the requests' handles."""
        events: list[Event] = []
        with self._lock:
            if result.images or result.failed or plan.dropped:
                self._held = False  # a job left: what it held (a LoRA slot) may be free now
            for job_id, total in result.admitted.items():
                if job_id in self._records:
                    self._records[job_id].total = total
            for job_id in result.stepped:
                record = self._records.get(job_id)
                if record is None:
                    continue
                record.done += 1
                events.append(Progress(job_id, record.done, record.total))
                if record.done >= record.total:
                    self._leave_lane(record)
                    self._finished.append(record)
            events += [Preview(job_id, number, image) for job_id, number, image in result.previews
                       if job_id in self._records]
            decoded = set(plan.decode)
            self._finished = [record for record in self._finished if record.job.id not in decoded]
            for job_id, image in result.images.items():
                if self._records.pop(job_id, None) is not None:
                    events.append(Finished(job_id, image))
            for job_id, error in result.failed.items():
                if job_id in self._records:
                    self._end(self._records[job_id].job.request_id, error)
            events += self._ended
            self._ended = []
        return events

    # --- bookkeeping (under the lock) --------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool((self._waiting and not self._held) or self._lanes or self._finished or self._to_free or self._ended)

    def _end(self, request_id: str, error: BaseException) -> None:
        """Remove every job of the request; admitted ones go to the next plan's `dropped`."""
        ended = [record for record in self._records.values() if record.job.request_id == request_id]
        if not ended:
            return
        ids = {record.job.id for record in ended}
        self._waiting = deque(record for record in self._waiting if record.job.id not in ids)
        for record in ended:
            self._leave_lane(record)
            del self._records[record.job.id]
        self._finished = [record for record in self._finished if record.job.id not in ids]
        self._to_free += [record.job.id for record in ended if record.admitted]
        self._ended.append(Failed(ended[0].job.id, error))

    def _leave_lane(self, record: _Record) -> None:
        jobs = self._lanes.get(record.job.lane)
        if jobs is None or record not in jobs:
            return
        jobs.remove(record)
        self._active -= 1
        if not jobs:
            del self._lanes[record.job.lane]
