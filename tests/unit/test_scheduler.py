"""The scheduler's planning, without tensors: admission, lanes, round-robin, the queue bound, dropping."""

import pytest

from kiln.engine.requests import ImageRequest, RequestHandle
from kiln.engine.errors import QueueFull
from kiln.engine.scheduler import Scheduler


def request_jobs(n=1, size=64, steps=4):
    handle = RequestHandle(ImageRequest("p", size, size, steps, 0.0, n=n, seed=1), lane=(size, size))
    for job in handle.jobs:
        job.total_steps = steps
    return handle


def test_admission_is_fcfs_and_bounded_by_max_batch_size():
    scheduler = Scheduler(max_batch_size=3, max_queue_size=10)
    first, second = request_jobs(n=2), request_jobs(n=2)
    scheduler.add(first.jobs)
    scheduler.add(second.jobs)
    plan = scheduler.schedule()
    assert plan.admitted == first.jobs + second.jobs[:1]
    assert plan.jobs == plan.admitted
    assert scheduler.waiting_count == 1 and scheduler.active_count == 3


def test_finished_jobs_leave_and_waiting_jobs_join_at_the_next_step():
    scheduler = Scheduler(max_batch_size=2, max_queue_size=10)
    a, b, c = request_jobs(), request_jobs(), request_jobs()
    for handle in (a, b, c):
        scheduler.add(handle.jobs)
    plan = scheduler.schedule()
    assert plan.jobs == a.jobs + b.jobs
    a.jobs[0].done_steps = a.jobs[0].total_steps
    scheduler.update(plan)
    plan = scheduler.schedule()
    assert plan.admitted == c.jobs
    assert plan.jobs == b.jobs + c.jobs


def test_lanes_by_size_take_turns():
    scheduler = Scheduler(max_batch_size=8, max_queue_size=10)
    small, large = request_jobs(size=64), request_jobs(size=128)
    scheduler.add(small.jobs)
    scheduler.add(large.jobs)
    lanes = [scheduler.schedule().lane for _ in range(4)]
    assert lanes == [(64, 64), (128, 128), (64, 64), (128, 128)]


def test_queue_bound_refuses_the_whole_request_and_keeps_the_queue():
    scheduler = Scheduler(max_batch_size=1, max_queue_size=3)
    scheduler.add(request_jobs(n=2).jobs)
    with pytest.raises(QueueFull, match="queue full"):
        scheduler.add(request_jobs(n=2).jobs)
    assert scheduler.waiting_count == 2
    scheduler.add(request_jobs(n=1).jobs)
    assert scheduler.waiting_count == 3


def test_cancelled_requests_are_dropped_from_queue_and_lanes():
    scheduler = Scheduler(max_batch_size=1, max_queue_size=10)
    running, waiting, other = request_jobs(), request_jobs(), request_jobs()
    for handle in (running, waiting, other):
        scheduler.add(handle.jobs)
    scheduler.schedule()
    running.cancel()
    waiting.cancel()
    plan = scheduler.schedule()
    assert set(plan.dropped) == set(running.jobs + waiting.jobs)
    assert plan.admitted == other.jobs and plan.jobs == other.jobs
    assert scheduler.waiting_count == 0
