"""The scheduler's contract without tensors: plans and results are plain data built here by hand.

schedule() -> StepPlan (who is admitted, which lane steps, who is decoded or dropped); update(plan, result) is the
only writer of job progress and returns the events the runner turns into handles' progress and results.
"""

import subprocess
import sys
import threading

import pytest

from kiln.engine.errors import EngineError, QueueFull, RequestAborted
from kiln.engine.requests import ImageRequest, LaneKey, job_specs
from kiln.engine.scheduler import Failed, Finished, Preview, Progress, Scheduler, StepResult


def jobs(n=1, size=64, request_id=None):
    request = ImageRequest("p", size, size, 4, 0.0, n=n, seed=1, **({"request_id": request_id} if request_id else {}))
    return job_specs(request, LaneKey(size, size))


def ids(specs):
    return tuple(job.id for job in specs)


def stepped(plan, total=2, **extra) -> StepResult:
    """What an executor reports for a plan: admitted jobs take `total` steps, every stepping job did one."""
    return StepResult(admitted={job.id: total for job in plan.admitted}, stepped=list(plan.step), **extra)


def test_admission_is_fcfs_and_bounded_by_max_batch_size():
    scheduler = Scheduler(max_batch_size=3, max_queue_size=10)
    first, second = jobs(n=2), jobs(n=2)
    scheduler.add(first)
    scheduler.add(second)
    plan = scheduler.schedule()
    assert plan.admitted == tuple(first + second[:1])
    assert plan.step == ids(plan.admitted) and plan.lane == LaneKey(64, 64)
    assert scheduler.waiting_count == 1 and scheduler.active_count == 3


def test_progress_comes_only_from_update_and_finished_jobs_are_decoded_next():
    scheduler = Scheduler(max_batch_size=2, max_queue_size=10)
    a, b, c = jobs(), jobs(), jobs()
    for specs in (a, b, c):
        scheduler.add(specs)
    plan = scheduler.schedule()
    assert plan.step == ids(a + b)
    events = scheduler.update(plan, StepResult(admitted={a[0].id: 1, b[0].id: 3}, stepped=list(plan.step)))
    assert events == [Progress(a[0].id, 1, 1), Progress(b[0].id, 1, 3)]
    plan = scheduler.schedule()  # a took its last step: decoded now, and its slot goes to c at once
    assert plan.decode == ids(a) and plan.admitted == tuple(c) and plan.step == ids(b + c)
    events = scheduler.update(plan, stepped(plan, images={a[0].id: "image-a"}))
    assert Finished(a[0].id, "image-a") in events
    assert scheduler.active_count == 2


def test_previews_become_events_of_their_job():
    scheduler = Scheduler(max_batch_size=4, max_queue_size=10)
    (job,) = jobs()
    scheduler.add([job])
    plan = scheduler.schedule()
    events = scheduler.update(plan, stepped(plan, total=4, previews=[(job.id, 0, "preview")]))
    assert events == [Progress(job.id, 1, 4), Preview(job.id, 0, "preview")]


def test_lanes_take_turns():
    scheduler = Scheduler(max_batch_size=8, max_queue_size=10)
    scheduler.add(jobs(size=64))
    scheduler.add(jobs(size=128))
    lanes = []
    for _ in range(4):
        plan = scheduler.schedule()
        scheduler.update(plan, stepped(plan, total=10))
        lanes.append(plan.lane)
    assert lanes == [LaneKey(64, 64), LaneKey(128, 128), LaneKey(64, 64), LaneKey(128, 128)]


def test_queue_bound_refuses_the_whole_request_and_keeps_the_queue():
    scheduler = Scheduler(max_batch_size=1, max_queue_size=3)
    scheduler.add(jobs(n=2))
    with pytest.raises(QueueFull, match="queue full"):
        scheduler.add(jobs(n=2))
    assert scheduler.waiting_count == 2
    scheduler.add(jobs(n=1))
    assert scheduler.waiting_count == 3


def test_an_abort_takes_the_jobs_out_at_once_and_the_next_plan_drops_their_state():
    scheduler = Scheduler(max_batch_size=1, max_queue_size=10)
    running, waiting, other = jobs(request_id="running"), jobs(request_id="waiting"), jobs(request_id="other")
    for specs in (running, waiting, other):
        scheduler.add(specs)
    plan = scheduler.schedule()
    scheduler.abort("running")
    scheduler.abort("waiting")
    assert scheduler.waiting_count == 1 and scheduler.active_count == 1  # its state is not freed yet
    events = scheduler.update(plan, stepped(plan, total=5))  # the step under way is ignored: its job left
    failures = [event for event in events if isinstance(event, Failed)]
    assert [event.job_id for event in failures] == [running[0].id, waiting[0].id]
    assert all(isinstance(event.error, RequestAborted) for event in failures)
    plan = scheduler.schedule()
    assert plan.dropped == ids(running)  # admitted: its state is freed; the waiting one never had any
    assert plan.admitted == tuple(other) and plan.step == ids(other)
    assert scheduler.update(plan, stepped(plan, total=5)) == [Progress(other[0].id, 1, 5)]
    assert scheduler.waiting_count == 0 and scheduler.active_count == 1


def test_a_failed_job_fails_its_whole_request_and_no_other():
    scheduler = Scheduler(max_batch_size=4, max_queue_size=10)
    pair, single = jobs(n=2), jobs()
    scheduler.add(pair)
    scheduler.add(single)
    plan = scheduler.schedule()
    error = EngineError("boom")
    events = scheduler.update(plan, StepResult(admitted={job.id: 3 for job in plan.admitted},
                                               stepped=[pair[1].id, single[0].id], failed={pair[0].id: error}))
    assert Failed(pair[0].id, error) in events and Progress(single[0].id, 1, 3) in events
    plan = scheduler.schedule()
    assert set(plan.dropped) == set(ids(pair)) and plan.step == ids(single)


def test_active_count_is_safe_to_read_while_lanes_change():
    """/metrics reads active_count from the event loop while the scheduler thread plans; counting by walking the
    lanes dict from another thread raised "dictionary changed size during iteration". A lanes dict that pauses any
    walk after its first lane until the planning thread has added a lane makes the race certain, not lucky."""
    scheduler = Scheduler(max_batch_size=64, max_queue_size=1000)
    walking, mutated = threading.Event(), threading.Event()

    class RacyLanes(type(scheduler._lanes)):
        def _paused(self, items):
            iterator = iter(items)
            for item in iterator:  # the first lane
                yield item
                break
            if threading.current_thread() is not planner:
                walking.set()
                mutated.wait(timeout=2)
            yield from iterator

        def values(self):
            return self._paused(super().values())

        def __iter__(self):
            return self._paused(super().__iter__())

    planner = threading.current_thread()
    scheduler._lanes = RacyLanes()
    for size in (64, 128):
        scheduler.add(jobs(size=size))
    plan = scheduler.schedule()  # two lanes
    scheduler.update(plan, stepped(plan, total=10))
    scheduler.add(jobs(size=192))
    counts, errors = [], []

    def read() -> None:
        try:
            counts.append(scheduler.active_count)
        except RuntimeError as error:
            errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    walking.wait(timeout=0.5)
    plan = scheduler.schedule()  # adds a third lane
    scheduler.update(plan, stepped(plan, total=10))
    mutated.set()
    reader.join(timeout=5)
    assert not errors and counts and counts[0] in (2, 3)


def test_the_scheduler_needs_no_torch():
    probe = "import sys, kiln.engine.scheduler, kiln.engine.requests; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
