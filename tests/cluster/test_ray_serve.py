"""The Ray tier: Kiln's API on a real two-node Ray Serve cluster (head 10.77.0.1, worker 10.77.0.2, in network
namespaces of the test's own; see ray_cluster.py), with tiny models, real HTTP and the real clients.

Tests run in file order and share two launches: `pair` (2 replicas, both on the head) and `spread` (2 replicas
over both nodes). Replicas reserve 0.5 CPU and run one torch thread.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from kiln.cluster.isolation import addresses, interfaces

from ..server.server_helpers import assert_error, same_image, wait_until

pytestmark = pytest.mark.ray

BODY = {"prompt": "a lighthouse", "size": "64x64", "response_format": "b64_json"}
LONG = 400  # steps: seconds of work on a tiny model


def generate(front: httpx.Client, uid: str, **fields) -> httpx.Response:
    return front.post("/v1/images/generations", json={**BODY, "model": uid, **fields})


def image_of(item: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    image.load()
    return image


def replicas(front: httpx.Client, uid: str) -> list[dict]:
    return front.get(f"/v1/models/{uid}").json()["replicas"]


def per_replica(front: httpx.Client, name: str, uid: str) -> dict[str, float]:
    values = {}
    for line in front.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{uid}",replica="'):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('replica="')[1].split('"')[0]] = float(value)
    return values


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    out, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[6:])))
    return out


def wait_for_replicas(front: httpx.Client, uid: str, count: int, timeout: float = 180.0) -> list[dict]:
    wait_until(lambda: len([r for r in replicas(front, uid) if r["status"] == "ready"]) == count,
               f"{count} ready replicas of {uid}", timeout)
    return replicas(front, uid)


# --- isolation first ------------------------------------------------------------------------------------------
def test_ray_runs_only_on_addresses_the_test_made(ray_cluster) -> None:
    assert interfaces() == sorted(["lo", ray_cluster.veth.local])
    assert set(addresses()) == {"127.0.0.1", ray_cluster.veth.local_ip}
    nodes = {node["ip"] for node in ray_cluster.nodes()}
    assert nodes == {ray_cluster.veth.local_ip, ray_cluster.veth.peer_ip}


# --- launch fields ----------------------------------------------------------------------------------------------
def test_launch_fields_the_cluster_cannot_honour_are_400s(front, ray_cluster) -> None:
    launch = {"model_name": "sd-turbo", "tiny": True, "model_uid": "never"}
    assert_error(front.post("/v1/models", json={**launch, "gpu_idx": [0]}), 400, "gpu_idx", "2 nodes", "worker_ip")
    assert_error(front.post("/v1/models", json={**launch, "worker_ip": "10.9.9.9"}), 400, "worker_ip",
                 ray_cluster.veth.peer_ip)
    assert_error(front.post("/v1/models", json={**launch, "n_gpu": 1}), 400, "n_gpu", "has 0")
    assert_error(front.post("/v1/models", json={**launch, "replica": 0}), 400, "replica")
    assert front.get("/v1/models").json()["data"] == []


@pytest.fixture(scope="module")
def pair(front, ray_cluster) -> str:
    """Launched exactly as xinference-client 4.1.0 launches, with replica=2, both replicas on the head."""
    from xinference_client import RESTfulClient

    client = RESTfulClient(ray_cluster.url)
    uid = client.launch_model(model_name="sd-turbo", model_type="image", model_uid="pair", replica=2,
                              worker_ip=ray_cluster.veth.local_ip, tiny=True)
    assert uid == "pair"
    return uid


def test_xinference_client_launches_two_replicas_and_generates(front, ray_cluster, pair) -> None:
    from xinference_client import RESTfulClient

    description = front.get("/v1/models/pair").json()
    assert description["replica"] == 2 and description["status"] == "ready"
    listed = wait_for_replicas(front, pair, 2)
    assert {r["node"] for r in listed} == {ray_cluster.veth.local_ip}
    assert len({r["pid"] for r in listed}) == 2 and len({r["id"] for r in listed}) == 2
    model = RESTfulClient(ray_cluster.url).get_model(pair)
    result = model.text_to_image("a fox", size="64*64", response_format="b64_json", seed=5)
    assert result["data"][0]["seed"] == 5


def test_openai_sdk_generates_and_streams(ray_cluster, pair) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{ray_cluster.url}/v1", api_key="unused")
    result = client.images.generate(model=pair, prompt="a fox", size="64x64", response_format="b64_json")
    assert result.data[0].b64_json
    kinds = [event.type for event in client.images.generate(model=pair, prompt="a fox", size="64x64", stream=True,
                                                             partial_images=2, extra_body={"num_inference_steps": 20})]
    assert kinds[-1] == "image_generation.completed" and "image_generation.partial_image" in kinds


def test_load_spreads_over_both_replicas_beyond_serves_default_of_five(front, pair) -> None:
    """Twelve long requests are all under way at once (Serve's default max_ongoing_requests of 5 would hold
    back seven), and both replicas take a share."""
    ids = [f"spread-{i}" for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(generate, front, pair, num_inference_steps=150, seed=i, request_id=rid)
                   for i, rid in enumerate(ids)]

        def all_running() -> bool:
            return all(front.get(f"/v1/requests/{rid}/progress").status_code == 200 for rid in ids)

        wait_until(all_running, "all twelve requests under way", 120)
        assert all(future.result().status_code == 200 for future in futures)
    wait_until(lambda: sum(per_replica(front, "kiln_images_generated_total", pair).values()) >= 12,
               "every replica's report")
    made = per_replica(front, "kiln_images_generated_total", pair)
    assert len(made) == 2 and min(made.values()) >= 3, made


def test_progress_and_abort_reach_the_replica_holding_the_request(front, pair) -> None:
    with ThreadPoolExecutor(2) as pool:
        futures = {rid: pool.submit(generate, front, pair, num_inference_steps=LONG, request_id=rid)
                   for rid in ("abort-a", "abort-b")}
        for rid in futures:
            wait_until(lambda: (front.get(f"/v1/requests/{rid}/progress").json().get("progress") or 0) > 0,
                       f"{rid} under way", 120)
        for rid in futures:
            assert front.post(f"/v1/models/{pair}/requests/{rid}/abort").json() == {"msg": "DONE"}
        for rid, future in futures.items():
            assert_error(future.result(), 409, "cancelled")
            assert front.get(f"/v1/requests/{rid}/progress").json() == {"progress": 1.0}
    assert front.post(f"/v1/models/{pair}/requests/nobody/abort").json() == {"msg": "NOT_FOUND"}
    wait_until(lambda: sum(per_replica(front, "kiln_active_jobs", pair).values()) == 0, "the jobs left", 30)


def test_a_client_that_leaves_cancels_its_request_on_the_replica(front, ray_cluster, pair) -> None:
    with httpx.Client(base_url=ray_cluster.url, timeout=2) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/images/generations", json={**BODY, "model": pair, "size": "256x256",
                                                           "num_inference_steps": 500})
    wait_until(lambda: sum(per_replica(front, "kiln_active_jobs", pair).values()) == 0, "the jobs left", 30)


def test_a_killed_replica_under_load(front, ray_cluster, pair) -> None:
    """SIGKILL one replica while eight requests run: each non-streaming one still returns 200 with the image
    its seed gives alone; a stream that had sent a partial image ends with a clean `error` event; Serve brings
    the replica count back."""
    before = wait_for_replicas(front, pair, 2)
    seeds = [11, 12, 13, 14, 15, 16]
    streams: list[list[tuple[str, dict]]] = [[], []]
    partial_seen = [threading.Event(), threading.Event()]

    def stream(index: int) -> None:
        body = {**BODY, "model": pair, "stream": True, "partial_images": 3, "num_inference_steps": LONG,
                "size": "128x128", "seed": 100 + index}  # 128 px: the stream outlasts a report or two
        with httpx.Client(base_url=ray_cluster.url, timeout=300) as client:
            with client.stream("POST", "/v1/images/generations", json=body) as response:
                name = None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        streams[index].append((name, json.loads(line[6:])))
                        if name.endswith("partial_image"):
                            partial_seen[index].set()

    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(generate, front, pair, num_inference_steps=200, seed=seed) for seed in seeds]
        readers = [pool.submit(stream, index) for index in range(2)]
        for seen in partial_seen:
            assert seen.wait(120), "a stream never sent a partial image"
        # Replicas report once a second, so the first report may predate the jobs: wait for one that shows them.
        active: dict[str, float] = {}

        def some_replica_busy() -> bool:
            active.update(per_replica(front, "kiln_active_jobs", pair))
            return max(active.values(), default=0) > 0

        wait_until(some_replica_busy, "a replica's report of its jobs", 30)
        victim = max(before, key=lambda r: active.get(r["id"], 0))
        assert active.get(victim["id"], 0) > 0, active
        os.kill(victim["pid"], signal.SIGKILL)
        responses = [future.result() for future in plain]
        for reader in readers:
            reader.result()
    assert [r.status_code for r in responses] == [200] * len(seeds), [r.text[:200] for r in responses]
    for seed, response in zip(seeds, responses):
        item = response.json()["data"][0]
        alone = generate(front, pair, num_inference_steps=200, seed=seed).json()["data"][0]
        assert item["seed"] == seed and same_image(image_of(item), image_of(alone))
    for received in streams:
        name, data = received[-1]
        if name == "error":
            assert set(data) == {"error", "detail"} and "died" in data["error"]["message"], data
        else:
            assert name == "image_generation.completed", received[-1]
    assert any(received[-1][0] == "error" for received in streams) or victim["pid"] not in {
        r["pid"] for r in replicas(front, pair)}
    # Serve notices the death at its next health check: until then the dead replica may still be listed ready.
    def replaced() -> bool:
        ready = [r["pid"] for r in replicas(front, pair) if r["status"] == "ready"]
        return len(ready) == 2 and victim["pid"] not in ready

    wait_until(replaced, "two ready replicas, the killed one replaced", 180)


def test_metrics_label_each_replica_and_include_serves_own(front, pair) -> None:
    wait_until(lambda: len(per_replica(front, "kiln_images_generated_total", pair)) == 2, "two replicas' reports")
    text = front.get("/metrics").text
    listed = replicas(front, pair)
    for replica in listed:
        assert (f'kiln_replica_info{{model_uid="pair",replica="{replica["id"]}",pid="{replica["pid"]}",'
                f'node="{replica["node"]}"}} 1') in text
    wait_until(lambda: "ray_serve_" in front.get("/metrics").text, "Serve's own metrics", 60)


# --- two nodes --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spread(front) -> str:
    response = front.post("/v1/models", json={"model_name": "sd-turbo", "model_uid": "spread", "tiny": True,
                                              "replica": 2, "request_limits": 2})
    assert response.status_code == 200, response.text
    return "spread"


def test_two_nodes_run_one_replica_each_and_serve_url_images(front, ray_cluster, spread) -> None:
    listed = wait_for_replicas(front, spread, 2)
    assert {r["node"] for r in listed} == {ray_cluster.veth.local_ip, ray_cluster.veth.peer_ip}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda seed: generate(front, spread, response_format="url", seed=seed,
                                                        num_inference_steps=100), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    for response in responses:
        url = response.json()["data"][0]["url"]
        assert url.startswith(ray_cluster.url)
        image = front.get(url)
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    wait_until(lambda: sum(per_replica(front, "kiln_images_generated_total", spread).values()) >= 4, "reports")
    made = per_replica(front, "kiln_images_generated_total", spread)
    assert all(count > 0 for count in made.values()), made


def test_request_limits_answer_429_with_retry_after(front, spread) -> None:
    """request_limits=2 per replica, 2 replicas: of six long requests at once, two wait with a 429."""
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda seed: generate(front, spread, seed=seed, num_inference_steps=LONG),
                                  range(6)))
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) == 2 and all(r.headers["Retry-After"] for r in refused), [r.status_code for r in responses]
    assert_error(refused[0], 429, "request_limits")


def test_the_replica_count_changes_without_restarting_the_others(front, pair) -> None:
    before = {r["pid"] for r in wait_for_replicas(front, pair, 2)}
    assert front.post(f"/v1/models/{pair}/replicas", json={"replica": 3}).status_code == 200
    after = {r["pid"] for r in wait_for_replicas(front, pair, 3)}
    assert before < after
    assert front.get(f"/v1/models/{pair}/replicas").json()["replica"] == 3


def test_ocr_models_run_as_replicas_too(front) -> None:
    from ..server.ocr_helpers import png, render

    assert front.post("/v1/models", json={"model_name": "PP-OCR", "model_uid": "ocr", "replica": 1}).status_code == 200
    response = front.post("/v1/images/ocr", data={"model": "ocr"}, files={"image": ("a.png", png(render("KILN 42").image))})
    assert response.status_code == 200 and "KILN" in response.json(), response.text
    assert [r["status"] for r in replicas(front, "ocr")] == ["ready"]
    assert front.delete("/v1/models/ocr").status_code == 200


def test_controlnet_units_reach_the_replica(front) -> None:
    """A ControlNet unit (its control image decoded by the front) runs on the replica: the same request gives
    the same image twice, and a different one than without the unit."""
    launch = {"model_name": "stable-diffusion-v1.5", "model_uid": "cn", "tiny": True, "controlnet": "canny",
              "replica": 1}
    assert front.post("/v1/models", json=launch).status_code == 200
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (20, 0, 24, 64))
    buffer = io.BytesIO()
    edges.save(buffer, format="PNG")
    unit = {"name": "canny", "image": base64.b64encode(buffer.getvalue()).decode()}
    fields = {"num_inference_steps": 3, "guidance_scale": 4.0, "seed": 5}
    with_unit = [generate(front, "cn", controlnet=[unit], **fields) for _ in range(2)]
    assert [r.status_code for r in with_unit] == [200, 200], with_unit[0].text
    plain = generate(front, "cn", controlnet=[], **fields)
    assert plain.status_code == 200, plain.text
    first, second = (image_of(r.json()["data"][0]) for r in with_unit)
    assert same_image(first, second)
    assert not same_image(first, image_of(plain.json()["data"][0]))
    assert front.delete("/v1/models/cn").status_code == 200


def test_requests_naming_a_lora_go_to_the_replica_that_holds_it(front, tiny_lora_dir) -> None:
    """Two replicas with one per-row LoRA slot each, LoRAs read from lora_dir on first use: the first request
    for `style` has one replica load it, and the next ones go to that replica (the other never loads it). Each
    image is the one a single-process runner makes for its seed, and style changes the image."""
    from kiln.engine.catalogue import CATALOGUE
    from kiln.engine.options import parse_launch_options
    from kiln.engine.runner import Runner
    from kiln.engine.schema import Limits, parse_image_request

    options = {"lora_dir": str(tiny_lora_dir("sd-turbo")), "max_loras": 1, "backend": "eager"}
    launch = {"model_name": "sd-turbo", "model_uid": "loras", "tiny": True, "replica": 2, **options}
    assert front.post("/v1/models", json=launch).status_code == 200
    fields = {"prompt": BODY["prompt"], "size": BODY["size"], "num_inference_steps": 30,
              "lora": [{"name": "style", "scale": 1.0}]}
    seeds = (1, 2, 3, 4, 5)
    first = generate(front, "loras", **fields, seed=seeds[0])
    assert first.status_code == 200, first.text

    def holders() -> list[str]:
        return [r["id"] for r in replicas(front, "loras") if "style" in r["loras"]]

    def made() -> dict[str, float]:
        return per_replica(front, "kiln_images_generated_total", "loras")

    wait_until(lambda: len(holders()) == 1, "one replica reporting style resident", 30)
    assert front.get("/v1/models/loras").json()["lora"]["resident"] == ["style"]  # whichever replica describes
    images = [image_of(first.json()["data"][0])]
    images += [image_of(generate(front, "loras", **fields, seed=seed).json()["data"][0])
               for seed in seeds[1:]]
    wait_until(lambda: sum(made().values()) == len(seeds), "every replica's report")
    assert made()[holders()[0]] == len(seeds), made()
    assert sum(per_replica(front, "kiln_lora_loads_total", "loras").values()) == 1
    plain = generate(front, "loras", **{**fields, "lora": []}, seed=seeds[0])
    assert not same_image(images[0], image_of(plain.json()["data"][0]))

    spec = CATALOGUE["sd-turbo"]
    solo = Runner("solo", spec, parse_launch_options(spec, {"tiny": True, **options}))
    solo.load()
    try:
        for seed, image in zip(seeds, images):
            request = parse_image_request(spec, {**fields, "seed": seed}, limits=Limits()).request
            assert same_image(image, solo.submit(request).future.result()[0].image), seed
    finally:
        solo.close()
    assert front.delete("/v1/models/loras").status_code == 200


def test_terminate_removes_every_replica(front, pair, spread) -> None:
    pids = {r["pid"] for uid in (pair, spread) for r in replicas(front, uid)}
    for uid in (pair, spread):
        assert front.delete(f"/v1/models/{uid}").status_code == 200
        assert_error(front.get(f"/v1/models/{uid}"), 404, "not running")

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(lambda: all(gone(pid) for pid in pids), "every replica process to exit", 60)
