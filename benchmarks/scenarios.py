"""What a benchmark asks for: scenarios (closed loop, open loop, burst) over a mix of request classes.

A scenario file (TOML or JSON) holds a list of scenarios and, optionally, a top-level `mix` that scenarios
without their own use:

    mix = [{model = "stable-diffusion-v1.5", size = "64x64", steps = 8, guidance = 7.5, weight = 1}]

    [[scenario]]
    name = "closed"
    kind = "closed"            # C clients, each sending its next request when the last one returns
    concurrency = [1, 4, 8, 16]
    requests_per_client = 8    # or `requests` (total per level)

    [[scenario]]
    name = "poisson"
    kind = "open"              # Poisson arrivals
    load = 0.7                 # a fraction of Kiln's measured capacity on this mix (or `rate`, images/s)
    requests = 200

    [[scenario]]
    name = "burst"
    kind = "burst"             # every request at once
    requests = 32

A request class with `controlnet = "canny"` sends a ControlNet unit (Kiln only; the model is launched with the
ControlNets its classes name), one with `lora = "name"` asks for that LoRA (Kiln only); a scenario's `launch`
table adds Kiln launch options to its plans' models (Kiln relaunches a model between plans whose options differ),
e.g. `launch = {controlnet_lanes = "split"}`, where `loras = {name = {rank, alpha, denoiser, text}}` (made with
peft on the tiny checkpoint) and `tiny_loras = [names]` (the tests' tiny LoRAs) become its peft_model_config (see
scenarios/lora.toml); `draw_as = "<another scenario>"` gives it that scenario's very requests.

Every system sees exactly the same requests (prompts, seeds, sizes, arrival times): they are drawn once, from
`seed`, by `plan()`.
"""

from __future__ import annotations

import json
import random
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

KINDS = ("closed", "open", "burst")
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT_SCENARIO_FILE = SCENARIO_DIR / "default.toml"

# Prompts of different lengths; CLIP pads to 77 tokens, so the length changes nothing but tokenisation.
PROMPTS = (
    "a red fox in the snow",
    "a lighthouse at dusk, oil painting",
    "an astronaut riding a horse on the moon, detailed, 4k",
    "a bowl of ramen",
    "a watercolor map of an imaginary island with mountains, rivers and a small harbour town",
    "portrait of an old fisherman, dramatic lighting",
    "a cat",
    "isometric pixel art of a cozy library",
)


class ScenarioError(ValueError):
    """A scenario file or option is invalid; the message names the field."""


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in a mix, drawn with probability proportional to `weight`."""

    model: str = "stable-diffusion-v1.5"
    width: int = 64
    height: int = 64
    steps: int = 8
    guidance: float = 7.5
    n: int = 1
    weight: float = 1.0
    controlnet: str | None = None  # a ControlNet unit (Kiln only): the name of a ControlNet the model is launched with
    lora: str | None = None  # a LoRA its requests ask for (Kiln only), by its name in the launch

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class BenchRequest:
    """One concrete request: what each system is sent. `at` is the arrival offset in seconds (open loop)."""

    id: str
    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    n: int = 1
    at: float = 0.0
    controlnet: str | None = None
    lora: str | None = None

    @property
    def batch_key(self) -> tuple:
        """What requests must share to run in one plain pipeline call (static batching)."""
        return (self.model, self.width, self.height, self.steps, self.guidance, self.controlnet, self.lora)


@dataclass(frozen=True)
class Scenario:
    """A load pattern over a mix. Closed scenarios with several concurrency levels expand to one plan each."""

    name: str
    kind: str
    mix: tuple[RequestClass, ...] = (RequestClass(),)
    concurrency: tuple[int, ...] = (1, 4, 8, 16)  # closed loop only
    requests: int | None = None  # total requests (per level for closed loops)
    requests_per_client: int | None = None  # closed loop: requests = concurrency * this (default 8)
    rate: float | None = None  # open loop: images per second
    load: float | None = None  # open loop: fraction of Kiln's capacity on this mix (resolved after Kiln's closed runs)
    seed: int = 0
    launch: Mapping[str, Any] = field(default_factory=dict)  # Kiln launch options of this scenario's models
    draw_as: str | None = None  # draw the same requests as the scenario of this name (compare launch options)


@dataclass
class Plan:
    """One scenario at one setting, with its requests drawn: the unit every system runs and is reported by."""

    name: str  # e.g. "closed-c16", "poisson", "burst"
    scenario: str
    kind: str
    requests: list[BenchRequest]
    concurrency: int | None = None
    rate: float | None = None  # images/s of the open loop, once known
    load: float | None = None  # the capacity fraction asked for, if any
    mix: tuple[RequestClass, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)
    launch: dict[str, Any] = field(default_factory=dict)  # Kiln launch options the plan runs under

    @property
    def images(self) -> int:
        return sum(request.n for request in self.requests)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(request.model for request in self.requests))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mix"] = [asdict(item) for item in self.mix]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        fields = dict(data)
        fields["requests"] = [BenchRequest(**item) for item in fields["requests"]]
        fields["mix"] = tuple(RequestClass(**item) for item in fields.get("mix", ()))
        return cls(**fields)


# --- parsing -----------------------------------------------------------------------------------------------------
def parse_size(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, str):
        parts = value.lower().replace("*", "x").split("x")
        if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
            return int(parts[0]), int(parts[1])
    raise ScenarioError(f"{where}: size must be WIDTHxHEIGHT (e.g. '64x64'), got {value!r}")


def parse_mix(items: Any, where: str) -> tuple[RequestClass, ...]:
    if not isinstance(items, list) or not items:
        raise ScenarioError(f"{where}: mix must be a non-empty list of request classes")
    mix = []
    for index, item in enumerate(items):
        spot = f"{where}.mix[{index}]"
        if not isinstance(item, Mapping):
            raise ScenarioError(f"{spot}: a request class is a table, got {item!r}")
        item = dict(item)
        known = {"model", "size", "width", "height", "steps", "guidance", "n", "weight", "controlnet", "lora"}
        unknown = set(item) - known
        if unknown:
            raise ScenarioError(f"{spot}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        if "size" in item:
            item["width"], item["height"] = parse_size(item.pop("size"), spot)
        try:
            request_class = RequestClass(**item)
        except TypeError as error:
            raise ScenarioError(f"{spot}: {error}") from None
        if request_class.weight <= 0 or request_class.steps < 1 or request_class.n < 1:
            raise ScenarioError(f"{spot}: weight must be > 0, steps and n >= 1")
        mix.append(request_class)
    return tuple(mix)


def parse_scenarios(data: Mapping[str, Any], where: str = "scenario file") -> list[Scenario]:
    """Scenarios from the parsed contents of a scenario file."""
    default_mix = parse_mix(data["mix"], where) if "mix" in data else (RequestClass(),)
    items = data.get("scenario", data.get("scenarios"))
    if not isinstance(items, list) or not items:
        raise ScenarioError(f"{where}: needs a non-empty `scenario` list ([[scenario]] tables in TOML)")
    scenarios = []
    for index, item in enumerate(items):
        spot = f"{where}: scenario[{index}]"
        if not isinstance(item, Mapping):
            raise ScenarioError(f"{spot} must be a table")
        item = dict(item)
        if item.get("kind") not in KINDS:
            raise ScenarioError(f"{spot}: kind must be one of {', '.join(KINDS)}, got {item.get('kind')!r}")
        item.setdefault("name", item["kind"])
        item["mix"] = parse_mix(item["mix"], spot) if "mix" in item else default_mix
        if "concurrency" in item:
            levels = item["concurrency"]
            item["concurrency"] = tuple(levels if isinstance(levels, list) else [levels])
        known = set(Scenario.__dataclass_fields__)
        unknown = set(item) - known
        if unknown:
            raise ScenarioError(f"{spot}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        scenario = Scenario(**item)
        check_scenario(scenario, spot)
        scenarios.append(scenario)
    names = [scenario.name for scenario in scenarios]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{where}: scenario names must be unique, got {names}")
    return scenarios


def check_scenario(scenario: Scenario, where: str) -> None:
    if scenario.kind == "closed" and (not scenario.concurrency or min(scenario.concurrency) < 1):
        raise ScenarioError(f"{where}: concurrency levels must be >= 1")
    if scenario.kind == "open":
        if (scenario.rate is None) == (scenario.load is None):
            raise ScenarioError(f"{where}: an open loop needs exactly one of `rate` (images/s) or `load` "
                                "(fraction of Kiln's capacity)")
        if (scenario.rate or 1) <= 0 or (scenario.load or 1) <= 0:
            raise ScenarioError(f"{where}: rate and load must be > 0")
    if scenario.requests is not None and scenario.requests < 1:
        raise ScenarioError(f"{where}: requests must be >= 1")
    if not isinstance(scenario.launch, Mapping):
        raise ScenarioError(f"{where}: launch must be a table of Kiln launch options")


def load_scenario_file(path: Path | str) -> list[Scenario]:
    """Scenarios from a .toml or .json file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ScenarioError(f"cannot read scenario file {path}: {error}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ScenarioError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {error}") from None
    return parse_scenarios(data, str(path))


# --- drawing requests ---------------------------------------------------------------------------------------------
def draw_requests(mix: Sequence[RequestClass], count: int, rng: random.Random, prefix: str) -> list[BenchRequest]:
    """`count` requests drawn from the mix by weight, each with a prompt and a seed of its own."""
    weights = [item.weight for item in mix]
    requests = []
    for index in range(count):
        item = rng.choices(mix, weights)[0]
        requests.append(BenchRequest(
            id=f"{prefix}-{index:05d}", model=item.model, prompt=rng.choice(PROMPTS), width=item.width,
            height=item.height, steps=item.steps, guidance=item.guidance, seed=rng.randrange(2**31 - 1), n=item.n,
            controlnet=item.controlnet, lora=item.lora,
        ))
    return requests


def plan(scenario: Scenario, rate: float | None = None) -> list[Plan]:
    """The scenario's plans with their requests drawn (deterministically from its seed). An open loop needs its
    rate: the scenario's own, else `rate` (resolved from `load` by the caller)."""
    rng = random.Random(f"{scenario.draw_as or scenario.name}:{scenario.seed}")
    if scenario.kind == "closed":
        plans = []
        for level in scenario.concurrency:
            count = scenario.requests or level * (scenario.requests_per_client or 8)
            name = f"{scenario.name}-c{level}"
            ids = f"{scenario.draw_as or scenario.name}-c{level}"
            plans.append(Plan(name, scenario.name, "closed", draw_requests(scenario.mix, count, rng, ids),
                              concurrency=level, mix=scenario.mix, launch=dict(scenario.launch)))
        return plans
    count = scenario.requests or (32 if scenario.kind == "burst" else 200)
    requests = draw_requests(scenario.mix, count, rng, scenario.name)
    if scenario.kind == "burst":
        return [Plan(scenario.name, scenario.name, "burst", requests, concurrency=count, mix=scenario.mix,
                     launch=dict(scenario.launch))]
    rate = scenario.rate if scenario.rate is not None else rate
    if rate is None or rate <= 0:
        raise ScenarioError(f"scenario {scenario.name}: the open-loop rate is not known (load={scenario.load})")
    # Poisson arrivals of requests: exponential gaps with mean (images per request) / (images per second).
    mean_images = sum(request.n for request in requests) / len(requests)
    clock, timed = 0.0, []
    for request in requests:
        clock += rng.expovariate(rate / mean_images)
        timed.append(replace(request, at=round(clock, 6)))
    return [Plan(scenario.name, scenario.name, "open", timed, rate=rate, load=scenario.load, mix=scenario.mix,
                 launch=dict(scenario.launch))]


def same_mix(a: Sequence[RequestClass], b: Sequence[RequestClass]) -> bool:
    """Whether two mixes draw the same request classes (weights normalised)."""
    def normal(mix: Sequence[RequestClass]) -> set:
        total = sum(item.weight for item in mix)
        return {replace(item, weight=round(item.weight / total, 9)) for item in mix}
    return normal(a) == normal(b)
