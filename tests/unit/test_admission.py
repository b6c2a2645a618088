"""The scheduler's admission gate (what holds a job until its LoRA is in a slot), without tensors."""

from kiln.engine.requests import ImageRequest, LaneKey, job_specs
from kiln.engine.scheduler import Scheduler, StepResult


def one_job(prompt):
    return job_specs(ImageRequest(prompt, 64, 64, 2, 0.0, seed=1), LaneKey(64, 64))


def test_held_jobs_keep_their_place_while_others_pass_and_the_loop_does_not_spin():
    ready = {"a": True, "b": False, "c": True}
    asked = []

    def admission():
        asked.append("round")
        return lambda job: ready[job.prompt]

    scheduler = Scheduler(max_batch_size=8, max_queue_size=8, admission=admission)
    a, b, c = one_job("a"), one_job("b"), one_job("c")
    for job in (a, b, c):
        scheduler.add(job)
    plan = scheduler.schedule()
    assert plan.admitted == (*a, *c) and scheduler.waiting_count == 1
    scheduler.update(plan, StepResult(admitted={a[0].id: 2, c[0].id: 2}, stepped=list(plan.step)))
    plan = scheduler.schedule()
    scheduler.update(plan, StepResult(stepped=list(plan.step)))
    plan = scheduler.schedule()  # a and c finished: decoded now; b still held
    assert plan.decode == (a[0].id, c[0].id) and not plan.admitted
    scheduler.update(plan, StepResult(images={a[0].id: "A", c[0].id: "C"}))
    assert scheduler.schedule().idle  # a job left: one more look, b still held
    assert not scheduler.wait_for_work(0.01)  # only b waits, and it is held: no busy loop
    ready["b"] = True
    scheduler.wake()  # what b waited for is ready
    assert scheduler.wait_for_work(0.01)
    assert scheduler.schedule().admitted == tuple(b)


def test_a_gate_round_sees_waiting_jobs_in_queue_order_up_to_the_batch_bound():
    seen = []

    def admission():
        return lambda job: seen.append(job.prompt) or True

    scheduler = Scheduler(max_batch_size=2, max_queue_size=8, admission=admission)
    for prompt in "xyz":
        scheduler.add(one_job(prompt))
    assert [job.prompt for job in scheduler.schedule().admitted] == ["x", "y"]
    assert seen == ["x", "y"]


def test_adding_or_aborting_unholds_the_queue():
    scheduler = Scheduler(max_batch_size=4, max_queue_size=8, admission=lambda: lambda job: job.prompt != "held")
    held = one_job("held")
    scheduler.add(held)
    assert scheduler.schedule().idle and not scheduler.wait_for_work(0.01)
    scheduler.add(one_job("free"))
    assert scheduler.wait_for_work(0.01)
    assert [job.prompt for job in scheduler.schedule().admitted] == ["free"]
    scheduler.abort(held[0].request_id)
    assert scheduler.waiting_count == 0
