"""ControlNet as a per-job part: the model's launched ControlNets stay resident, and each job brings its own units
(which ControlNet, control image, scale, window, guess mode), so jobs with and without ControlNet, or with other
ControlNets, scales and windows, share one lane and one denoiser forward.

At admission each unit's control image is prepared once (adapters.py). Before each forward the rows are grouped
by ControlNet; each runs on the rows where one of its units acts (rows.py), at scale 1 with each row's own
timestep and conditioning, and its outputs, scaled per row, reach only those rows through the denoiser's control
inputs. Requests come as `engine.controlnet_units.ControlUnit`s in `request.part_inputs["controlnet"]`.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.engine.controlnet_units import PART, check_unit
from kiln.engine.errors import InvalidRequest

from ..base import Part
from .adapters import ADAPTERS
from .loading import load_controlnets
from .rows import Active, Group, additions, scaled


class ControlNet(Part):
    name = PART
    backends = frozenset({"eager", "compile"})  # onnx and TensorRT export the denoiser without control inputs

    def __init__(self, family: Any, options: Any, spec: Any = None):
        super().__init__(family, options, spec)
        self.residents = load_controlnets(spec, options, family)
        self.adapter = ADAPTERS[family.spec.name](family)

    @classmethod
    def enabled(cls, spec: Any, options: Any) -> bool:
        return bool(options.controlnet)

    def used_by(self, request) -> bool:
        return PART in request.part_inputs

    def check(self, request) -> None:
        inputs = request.part_inputs[PART]
        units = inputs.get(PART)
        if set(inputs) != {PART} or not isinstance(units, tuple):
            raise InvalidRequest("controlnet: the units are not complete (complete them with "
                                 "engine.controlnet_units.complete_units)", PART)
        for index, unit in enumerate(units):
            where = f"controlnet[{index}]"
            check_unit(where, unit)
            if unit.name not in self.residents:
                raise InvalidRequest(f"{where}.name {unit.name!r} is not a launched ControlNet; this model has: "
                                     f"{', '.join(self.residents)}", PART)
            if unit.guess_mode and not self.adapter.guess_mode:
                raise InvalidRequest(f"{where}.guess_mode: guess mode is a UNet ControlNet feature (SD, SDXL); "
                                     f"{self.family.spec.name} ControlNets have none", PART)

    def lane_key(self, request):
        return "with" if self.options.controlnet_lanes == "split" else None

    @torch.no_grad()
    def prepare(self, state) -> None:
        units = []
        for unit in state.job.request.part_inputs[PART][PART]:
            model = self.residents[unit.name].model
            units.append(Active(unit.name, unit.scale, unit.start, unit.end,
                                self.adapter.is_guess_mode(model, unit.guess_mode),
                                self.adapter.prepare(model, unit.image, state)))
        state.parts[self.name] = units

    def before_forward(self, batch) -> None:
        pairs: dict[str, list[tuple[int, Active, str]]] = {}
        for row, (state, kind) in enumerate(batch.rows):
            if self in state.uses:
                for unit in state.parts[self.name]:
                    if unit.acts(state.step, len(state.timesteps), kind):
                        pairs.setdefault(unit.name, []).append((row, unit, kind))
        if pairs:
            groups = [self._run(name, some, batch.inputs) for name, some in pairs.items()]
            batch.inputs.update(additions(groups, self.family.denoiser.control_inputs, len(batch.rows)))

    def _run(self, name: str, pairs: list[tuple[int, Active, str]], inputs: dict[str, torch.Tensor]) -> Group:
        """ControlNet `name` on its pairs' rows, at scale 1; its outputs scaled per pair."""
        model = self.residents[name].model
        shared = self.family.denoiser.shared_inputs
        rows = torch.tensor([row for row, _, _ in pairs], device=self.family.device)
        sub = {key: value if key in shared else value[rows] for key, value in inputs.items()}
        samples = self.adapter.run(model, sub, torch.cat([unit.images[kind] for _, unit, kind in pairs]))
        factors = torch.stack([self.adapter.level_factors(len(samples), unit.scale, unit.guess_mode)
                               for _, unit, _ in pairs])
        names = self.family.denoiser.control_inputs
        return Group(rows, scaled(samples, factors), self.adapter.slots(model, samples, names))

    def example_inputs(self, inputs: dict[str, torch.Tensor], width: int, height: int) -> list[dict]:
        """Warm-up inputs with each launched ControlNet acting on every row (compile makes its graph variant
        at launch, not on the first ControlNet step)."""
        rows = next(value.shape[0] for key, value in inputs.items() if key not in self.family.denoiser.shared_inputs)
        variants = []
        for name, resident in self.residents.items():
            image = self.adapter.example_image(resident.model, width, height)
            pairs = [(row, Active(name, 1.0, 0.0, 1.0, False, {"cond": image}), "cond") for row in range(rows)]
            group = self._run(name, pairs, inputs)
            variants.append({**inputs, **additions([group], self.family.denoiser.control_inputs, rows)})
        return variants

    def describe(self) -> dict[str, Any]:
        return {"controlnet": [resident.describe() for resident in self.residents.values()]}

