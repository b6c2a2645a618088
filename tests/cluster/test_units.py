"""kiln.cluster without a cluster: the launch-field rules, Serve settings, the wire format, the retry rule, the
routing policy, the health rule on a real runner, the Serve config, and that the front imports neither torch
nor (until a command runs) Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from kiln.cluster import placement as p
from kiln.cluster.front import should_retry
from kiln.cluster.health import StallWatch, Unhealthy
from kiln.cluster.wire import (error_event, image_request, lora_set_id, lora_set_names, raise_error,
                               request_payload, request_work)
from kiln.engine.errors import EngineError, InvalidRequest, QueueFull, RequestAborted
from kiln.engine.requests import ImageRequest

ONE_NODE = p.ClusterView(("10.0.0.1",), gpus=4)
TWO_NODES = p.ClusterView(("10.0.0.1", "10.0.0.2"), gpus=0)


def place(cluster: p.ClusterView = ONE_NODE, **fields) -> p.Placement:
    body = {"model_name": "sd-turbo", **fields}
    placement = p.parse_placement(body, cluster)
    assert set(body) == {"model_name"}  # the scale-out fields are taken out of the launch body
    return placement


def test_launch_fields_map_to_a_placement() -> None:
    assert place() == p.Placement(replicas=1, gpus_per_replica=1.0)  # n_gpu absent is auto: a GPU if any
    assert place(n_gpu=None).gpus_per_replica == 0.0  # null: CPU, as Xinference's `--n-gpu none`
    assert place(TWO_NODES, n_gpu="auto").gpus_per_replica == 0.0
    assert place(replica=3, n_gpu=2, request_limits=4) == p.Placement(3, 2.0, request_limits=4)
    assert place(gpu_idx=[0, 1], replica=2) == p.Placement(2, 0.0, (0, 1))
    assert place(TWO_NODES, worker_ip="10.0.0.2").worker_ip == "10.0.0.2"


@pytest.mark.parametrize(("cluster", "fields", "words"), [
    (ONE_NODE, {"replica": 0}, ["replica", ">= 1"]),
    (ONE_NODE, {"replica": True}, ["replica"]),
    (ONE_NODE, {"n_gpu": 8}, ["n_gpu", "8 GPUs", "has 4"]),
    (ONE_NODE, {"n_gpu": 1, "gpu_idx": [0]}, ["n_gpu or gpu_idx"]),
    (TWO_NODES, {"gpu_idx": 0}, ["gpu_idx", "2 nodes", "worker_ip"]),
    (TWO_NODES, {"gpu_idx": 0, "worker_ip": "10.0.0.1"}, ["no GPUs"]),
    (TWO_NODES, {"worker_ip": "10.0.0.9"}, ["worker_ip", "10.0.0.1, 10.0.0.2"]),
    (ONE_NODE, {"request_limits": 0}, ["request_limits"]),
])
def test_launch_fields_the_cluster_cannot_honour(cluster, fields, words) -> None:
    with pytest.raises(InvalidRequest) as raised:
        p.parse_placement(dict(fields), cluster)
    assert raised.value.param == next(iter(fields)) or raised.value.param in fields
    for word in words:
        assert word in str(raised.value)


def test_serve_defaults_are_replaced_explicitly() -> None:
    """Serve's max_ongoing_requests default (5) would cap the service; its 20 s graceful shutdown would kill long
    generations; endless constructor retries would hide a model that cannot load."""
    options = p.deployment_options(p.Placement(2, 0.0, worker_ip="10.0.0.2"), cpus_per_replica=0.5)
    assert options["num_replicas"] == 2 and options["max_ongoing_requests"] >= 32
    assert options["graceful_shutdown_timeout_s"] >= 300 and options["max_constructor_retry_count"] <= 3
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"node:10.0.0.2": 0.001}}
    ingress = p.ingress_options()
    assert ingress["max_ongoing_requests"] >= 1000 and ingress["ray_actor_options"] == {"num_cpus": 0}
    assert ingress["graceful_shutdown_timeout_s"] >= 300
    assert p.device_for(p.Placement(2, 0.0, (3, 5)), 1) == "cuda:5" and p.device_for(p.Placement(), 0) is None


def test_a_request_crosses_as_plain_data_with_its_seeds_drawn() -> None:
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    request = ImageRequest("a fox", 64, 64, 20, 7.5, n=3, image=image, mask=Image.new("L", (64, 64), 255),
                           strength=0.5, request_id="r1")
    payload = request_payload(request)
    assert len(payload["seed"]) == 3 and all(isinstance(seed, int) for seed in payload["seed"])
    again = image_request(payload)
    assert again.seed == payload["seed"] and again.request_id == "r1" and again.mode == "inpainting"
    assert again.image.tobytes() == image.tobytes()
    assert request_payload(ImageRequest("x", 64, 64, 4, 0.0, n=2, seed=7))["seed"] == [7, 8]
    assert request_work(payload) == 3 * 10 * 64 * 64  # image to image runs steps x strength


def test_engine_errors_cross_and_are_raised_again() -> None:
    error = raise_error(error_event(InvalidRequest("bad size", "size", "invalid_size")))
    assert isinstance(error, InvalidRequest) and (error.param, error.code) == ("size", "invalid_size")
    for cls in (QueueFull, RequestAborted, EngineError):
        assert type(raise_error(error_event(cls("x")))) is cls
    assert str(raise_error(error_event(ZeroDivisionError("boom")))) == "ZeroDivisionError: boom"


def test_a_request_is_retried_once_and_only_before_its_client_saw_anything() -> None:
    assert should_retry(0, delivered=False)
    assert not should_retry(1, delivered=False)
    assert not should_retry(0, delivered=True)


def test_routing_prefers_less_work_then_an_open_lane_that_is_not_too_busy() -> None:
    pytest.importorskip("ray.serve")
    from kiln.cluster.routing import rank

    replicas = {"a": {"pending_work": 900.0, "open_lanes": [[64, 64]]}, "b": {"pending_work": 100.0},
                "c": {"pending_work": 150.0, "open_lanes": [[64, 64]]}}
    assert rank(replicas, [64, 64]) == ["c", "b", "a"]  # c's lane is open and its work within 2x of the least
    assert rank(replicas, [128, 128]) == ["b", "c", "a"]
    assert rank({}, None) == []


def test_a_lora_set_id_is_its_sorted_names() -> None:
    assert lora_set_id(["style", "detail", "style"]) == "detail/style"
    assert lora_set_names("detail/style") == ["detail", "style"]
    assert lora_set_id([]) == "" and lora_set_names("") == []


def test_the_front_sends_the_loras_a_request_runs_with_as_its_lora_set() -> None:
    from kiln.cluster.wire import request_lora_set
    from kiln.engine.lora_options import LoraOptions, LoraSource
    from kiln.engine.options import LaunchOptions

    launch = (LoraSource("style", "/loras/style.safetensors"), LoraSource("text", "/loras/text.safetensors", 0.5))
    per_row = LaunchOptions(lora=LoraOptions(loras=launch, max_loras=2))

    def asking(**inputs) -> ImageRequest:
        return ImageRequest("r", 64, 64, 4, 0.0, part_inputs={"lora": inputs} if inputs else {})

    assert request_lora_set(asking(), per_row) == "style/text"  # the launch default: every launch LoRA
    assert request_lora_set(asking(lora=[{"name": "text", "scale": 2.0}, "detail"]), per_row) == "detail/text"
    assert request_lora_set(asking(lora_name="detail", lora_scale=0.3), per_row) == "detail"
    assert request_lora_set(asking(lora=[]), per_row) == ""
    with pytest.raises(InvalidRequest, match="twice"):
        request_lora_set(asking(lora=["text", "text"]), per_row)
    fused = LaunchOptions(lora=LoraOptions(loras=launch))  # max_loras 0: in every replica's weights
    assert request_lora_set(asking(), fused) == "" and request_lora_set(asking(), LaunchOptions()) == ""


def test_routing_prefers_a_replica_holding_the_loras_while_it_is_not_too_busy() -> None:
    pytest.importorskip("ray.serve")
    from kiln.cluster.routing import rank

    work = 100.0
    idle = {"a": {"pending_work": 0.0}, "b": {"pending_work": 0.0, "loras": ["style"]}}
    assert rank(idle, None, ["style"], work) == ["b", "a"]
    assert rank(idle, None, [], work) == ["a", "b"]  # no LoRA: by work alone
    # A replica seen with up to the request's own work beyond twice the least still wins (it may have just
    # finished a request like this one); beyond that, the other replica loads the LoRA rather than queue.
    assert rank({**idle, "b": {"pending_work": work, "loras": ["style"]}}, None, ["style"], work) == ["b", "a"]
    busy = {"a": {"pending_work": 100.0}, "b": {"pending_work": 301.0, "loras": ["style"]}}
    assert rank(busy, None, ["style"], work) == ["a", "b"]
    # A set is held when every name is resident, whatever else is; LoRAs count before lanes (a job without its
    # LoRA waits for it, one without a lane only starts a batch of its own).
    stacked = {"a": {"pending_work": 0.0, "loras": ["style"], "open_lanes": [[64, 64]]},
               "b": {"pending_work": 50.0, "loras": ["text", "style", "detail"]}}
    assert rank(stacked, [64, 64], ["detail", "style"], work) == ["b", "a"]
    assert rank(stacked, [64, 64], ["style"], work) == ["a", "b"]
    # Where no replica holds the whole set, the one that holds more of it loads fewer, lanes coming after.
    partial = {"a": {"pending_work": 0.0, "open_lanes": [[64, 64]]}, "b": {"pending_work": 0.0, "loras": ["style"]}}
    assert rank(partial, [64, 64], ["detail", "style"], work) == ["b", "a"]


def test_a_burst_for_one_lora_spreads_over_both_replicas() -> None:
    """Each request goes where rank puts it and is booked there: the replica holding the LoRA takes the first
    two, then the other loads it, and from then on the load alternates."""
    pytest.importorskip("ray.serve")
    from kiln.cluster.routing import Bookings, rank

    bookings = Bookings()
    reports = {"a": {"pending_work": 0.0, "at": 1.0}, "b": {"pending_work": 0.0, "loras": ["style"], "at": 1.0}}
    chosen = []
    for index in range(8):
        estimates = {name: bookings.estimate(name, stats) for name, stats in reports.items()}
        chosen.append(rank(estimates, [64, 64], ["style"], 100.0)[0])
        bookings.book(f"s{index}", f"r{index}", chosen[-1], 100.0, ["style"], now=2.0 + index)
    assert chosen[:3] == ["b", "b", "a"] and chosen.count("a") == chosen.count("b") == 4


def test_bookings_count_until_a_report_shows_them() -> None:
    pytest.importorskip("ray.serve")
    from kiln.cluster.routing import Bookings

    bookings = Bookings()
    bookings.book("s1", "r1", "a", 100.0, ["style"], now=10.0)
    before = {"pending_work": 5.0, "at": 9.0}
    assert bookings.estimate("a", before) == {"pending_work": 105.0, "open_lanes": [], "loras": {"style"}}
    assert bookings.estimate("b", {"at": 9.0}) == {"pending_work": 0.0, "open_lanes": [], "loras": set()}
    # A later report that holds the request shows it; one that does not has it still on its way.
    assert bookings.estimate("a", {"pending_work": 80.0, "at": 11.0, "requests": ["r1"]})["pending_work"] == 80.0
    assert bookings.estimate("a", {"at": 11.0}) == {"pending_work": 100.0, "open_lanes": [], "loras": {"style"}}
    # Completed: its work is gone at once, its LoRA stays until a report taken after the booking.
    bookings.complete("s1")
    assert bookings.estimate("a", before) == {"pending_work": 5.0, "open_lanes": [], "loras": {"style"}}
    assert bookings.estimate("a", {"at": 11.0, "loras": ["detail"]})["loras"] == {"detail"}
    # Booked again (Serve sent it to another replica than the one ranked first): the booking moves.
    bookings.book("s2", "r2", "a", 50.0, [], now=12.0)
    bookings.book("s2", "r2", "b", 50.0, [], now=12.5)
    assert bookings.estimate("b", {"at": 9.0})["pending_work"] == 50.0
    assert bookings.estimate("a", {"at": 9.0})["pending_work"] == 0.0
    bookings.book("s3", "r3", "b", 1.0, [], now=13.0 + 31.0)  # past SENT_MEMORY_S: the others are forgotten
    assert bookings.estimate("a", before) == {"pending_work": 5.0, "open_lanes": [], "loras": set()}


def test_a_runner_that_stops_stepping_with_work_pending_is_unhealthy(tiny_root) -> None:
    from kiln.engine.catalogue import CATALOGUE
    from kiln.engine.options import LaunchOptions
    from kiln.engine.runner import Runner

    runner = Runner("stalled", CATALOGUE["sd-turbo"], LaunchOptions(tiny=True))
    runner.load(start=False)  # no scheduler thread: nothing will step
    now = [0.0]
    watch = StallWatch(runner, stall_seconds=60, clock=lambda: now[0])
    watch.check()
    now[0] = 600.0
    watch.check()  # idle: not stepping is fine
    runner.submit(ImageRequest("x", 64, 64, 4, 0.0))
    watch.check()
    now[0] = 630.0
    watch.check()
    now[0] = 700.0
    with pytest.raises(Unhealthy, match="1 images to work on"):
        watch.check()
    runner.iterate()  # a step: healthy again
    watch.check()
    runner.close()
    with pytest.raises(Unhealthy, match="stopped"):
        watch.check()


def test_a_models_figures_sum_over_its_replicas_parts_included() -> None:
    """ReplicaSet.stats() over two replicas' reports as they arrive (plain data): counters add, rows per forward
    add per size, and the parts' figures (resident LoRAs, loads) add by name."""
    import dataclasses
    import time

    from kiln.cluster.front import ReplicaSet
    from kiln.engine.endpoint import EndpointStats

    def report(replica, loads, rows):
        stats = EndpointStats(images_generated=loads, forward_rows={4: rows},
                              extra=(("kiln_lora_resident", "LoRAs in per-row slots.", 2),
                                     ("kiln_lora_loads_total", "LoRAs copied into a slot.", loads)))
        return {"replica": replica, "at": time.time(), "stats": json.loads(json.dumps(dataclasses.asdict(stats)))}

    replicas = ReplicaSet.__new__(ReplicaSet)  # no Serve application: only the reports matter here
    replicas._reports = {"a": report("a", 3, 1), "b": report("b", 5, 2)}
    total = replicas.stats()
    assert total.images_generated == 8 and total.forward_rows == {4: 3}
    assert total.extra == (("kiln_lora_resident", "LoRAs in per-row slots.", 4),
                           ("kiln_lora_loads_total", "LoRAs copied into a slot.", 8))


def test_ray_config_is_a_serve_deploy_config(capsys) -> None:
    from kiln.server.cli import main

    assert main(["ray-config", "--launch", "sd-turbo", "--replica-cpus", "0.5", "--port", "8000"]) == 0
    config = json.loads(capsys.readouterr().out)
    app = config["applications"][0]
    assert app["import_path"] == "kiln.cluster.ingress:build" and app["route_prefix"] == "/"
    assert app["args"] == {"launch": [{"model_name": "sd-turbo"}], "cpus_per_replica": 0.5, "threads": None}
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.port == 8000 and schema.proxy_location == "HeadOnly"


def test_the_front_imports_neither_torch_nor_ray() -> None:
    probe = ("import sys, kiln.server.app, kiln.server.cli, kiln.cluster.front, kiln.cluster.serve; "
             "print(sorted({'torch', 'diffusers', 'ray'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_models_resident_loras_are_those_of_every_replica() -> None:
    """GET /v1/models/{uid} on a replicated model: `lora.resident` joins what each replica holds (one replica's
    description of the engine would show only its own slots)."""
    import time

    from kiln.cluster.front import ReplicaSet

    def report(replica, loras):
        describe = {"model_name": "sd-turbo", "lora": {"mode": "per-row", "resident": loras, "max_loras": 2}}
        return {"replica": replica, "at": time.time(), "pid": 1, "node": "10.0.0.1", "status": "ready",
                "loras": loras, "describe": describe}

    replicas = ReplicaSet.__new__(ReplicaSet)  # no Serve application: only the reports matter here
    replicas._reports = {"a": report("a", []), "b": report("b", ["style", "detail"]), "c": report("c", ["style"])}
    replicas.placement, replicas.app_name = place(replica=3), "kiln-m-x"
    described = replicas.describe()
    assert described["lora"] == {"mode": "per-row", "resident": ["detail", "style"], "max_loras": 2}
    assert [r["loras"] for r in described["replicas"]] == [[], ["style", "detail"], ["style"]]
    for report in replicas._reports.values():  # a model launched without LoRAs describes "lora" as null
        report["describe"]["lora"] = None
    assert replicas.describe()["lora"] is None
