"""``calibrator: auto``: choose each activation quantizer's clipping range by the error it causes downstream.

The histogram of every activation is collected once (as for percentile/entropy/mse); each quantizer then has
four candidate ranges: max, percentile, entropy and mse. They are compared where the error matters, not on the
histogram: on a few calibration batches kept from the first pass (``AUTO_SAMPLES``), the model runs in float
and every candidate is tried on the real tensor:

- a quantizer that feeds a quantized Conv/Linear (its own ``input_quantizer``, or, in a traced model, a graph
  quantizer whose value a quantized layer takes as input): the squared error at that layer's output, with the
  layer's weights quantized as they will deploy (every such layer summed);
- any other quantizer (residual-add inputs, attention MatMul inputs): the squared error of the tensor itself.

The smallest summed error wins; ties go to the earlier candidate in ``CANDIDATES``. Cost: one more forward over
the kept batches plus, per candidate, one call of each quantized layer (or one fake-quantization) per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from compress.inputs import call_model
from compress.ptq.calibrators import HistogramCalibrator, Method
from compress.ptq.table import LayerCalibration
from compress.quant.layers import QuantLayer
from compress.quant.quantizer import TensorQuantizer

CANDIDATES = (Method.max, Method.percentile, Method.entropy, Method.mse)
# Samples of the calibration data the candidates are compared on (kept from the first pass).
AUTO_SAMPLES = 64


@dataclass
class Choice:
    """One quantizer's candidates, their summed errors and where the error was measured."""

    amax: dict[Method, torch.Tensor]
    measured_at: list[str]  # the layers whose outputs the error is taken at; [] = the tensor itself
    errors: dict[Method, float] = field(default_factory=dict)

    @property
    def best(self) -> Method:
        return min(CANDIDATES, key=lambda m: (self.errors.get(m, float("inf")), CANDIDATES.index(m)))

    def row(self, entry: LayerCalibration) -> LayerCalibration:
        """The calibration table's row for this quantizer: the chosen method, where and how the others fared."""
        best = self.errors.get(self.best, 0.0)
        relative = {m.value: (e / best if best > 0 else (1.0 if e == 0 else None)) for m, e in self.errors.items()}
        return replace(entry, method=self.best.value, measured_at=list(self.measured_at), errors=relative)


def candidates(cal: HistogramCalibrator, *, nonneg: bool, percentile: float) -> dict[Method, torch.Tensor]:
    """The four ranges of one histogram (``nonneg``: a uint8 tensor of non-negative values, 256 levels)."""
    levels = 256 if nonneg else 128
    found = {m: cal.compute_amax(m, percentile=percentile, levels=levels) for m in CANDIDATES if m is not Method.max}
    top = torch.as_tensor(float(cal.top), device=found[Method.percentile].device)
    return {Method.max: top, **found}


def consumers(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """For each activation quantizer, the quantized layers whose input it is (``[]``: none known)."""
    found: dict[str, list[str]] = {name: [] for name in names}
    for layer_name, layer in model.named_modules():
        q = getattr(layer, "input_quantizer", None)
        if isinstance(layer, QuantLayer) and isinstance(q, TensorQuantizer) and q.name in found:
            found[q.name].append(layer_name)
    if isinstance(model, fx.GraphModule):
        modules = dict(model.named_modules())
        for node in model.graph.nodes:
            if node.op != "call_module" or node.target not in found:
                continue
            for user in node.users:
                is_layer = user.op == "call_module" and isinstance(modules.get(user.target), QuantLayer)
                if is_layer and user.args and user.args[0] is node:
                    found[node.target].append(user.target)
    return found


def _fake_quant(q: TensorQuantizer, x: torch.Tensor, amax: torch.Tensor, nonneg: bool) -> torch.Tensor:
    qmin, qmax, zero, levels = q.spec.qrange(nonneg)
    scale = float(amax.clamp_min(1e-12)) / levels
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, qmin, qmax).to(x.dtype)


@torch.no_grad()
def measure(model: nn.Module, quantizers: dict[str, TensorQuantizer], choices: dict[str, Choice],
            nonneg: dict[str, bool], batches: list[object]) -> None:
    """Fill every choice's ``errors`` over ``batches``. The model's activation quantizers must pass their input
    through and its weight quantizers be on; ``nonneg[name]``: the quantizer's tensor was never negative."""
    modules = dict(model.named_modules())
    by_layer: dict[str, list[str]] = {}
    for name, choice in choices.items():
        for layer in choice.measured_at:
            by_layer.setdefault(layer, []).append(name)
    busy: set[str] = set()
    handles = []

    def at_layer(layer_name: str, args: tuple) -> None:
        if layer_name in busy or not args or not isinstance(args[0], torch.Tensor):
            return
        layer, x = modules[layer_name], args[0]
        busy.add(layer_name)
        try:
            ref = layer(x).float()
            for name in by_layer[layer_name]:
                q, choice = quantizers[name], choices[name]
                for method, amax in choice.amax.items():
                    err = (layer(_fake_quant(q, x, amax, nonneg[name])).float() - ref).pow(2).sum()
                    choice.errors[method] = choice.errors.get(method, 0.0) + float(err)
        finally:
            busy.discard(layer_name)

    def at_tensor(name: str, args: tuple) -> None:
        x, q, choice = args[0], quantizers[name], choices[name]
        for method, amax in choice.amax.items():
            err = (_fake_quant(q, x, amax, nonneg[name]).float() - x.float()).pow(2).sum()
            choice.errors[method] = choice.errors.get(method, 0.0) + float(err)

    for layer_name in by_layer:
        handles.append(modules[layer_name].register_forward_pre_hook(
            lambda _m, args, n=layer_name: at_layer(n, args)))
    for name, choice in choices.items():
        if not choice.measured_at:
            handles.append(quantizers[name].register_forward_pre_hook(lambda _m, args, n=name: at_tensor(n, args)))
    try:
        for inputs in batches:
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
