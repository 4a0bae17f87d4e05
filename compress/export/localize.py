"""Per-layer localisation: at which layer does a model's output start to depart from its reference?

Both models run as ONNX (a PyTorch reference is exported first, with the same BatchNorm folding), with
every Conv/ConvTranspose/Gemm/MatMul output exposed. An engine ONNX Runtime optimised (``FusedConv``,
``QLinearConv``, ``QGemm``...) is tapped on its un-fused view (:mod:`compress.export.unfuse`: the same
weights and scales, plain ops), in a session with graph optimisation off so that no tapped tensor is
fused away again; the engine's own check and timing still run at its deployed level. Layers are matched by the PyTorch module path
the exporter wrote into node names (``/layer2/conv1/Conv`` -> ``layer2.conv1``). For each layer the
relative error ``||out - ref|| / ||ref||`` over the data is computed, and its *jump*: the error minus
the largest error of the weighted layers feeding it. The layer a fault enters at jumps most; layers
after it inherit the error without jumping.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.export.unfuse import TAPPABLE, UNFUSED, unfuse, untapped_ops


@dataclass
class LayerError:
    layer: str
    rel_error: float
    jump: float
    inputs: list[str]  # the weighted layers feeding it

    def to_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "rel_error": round(self.rel_error, 6), "jump": round(self.jump, 6),
                "inputs": self.inputs}


@dataclass
class Localization:
    """Per-layer errors sorted by jump (largest first), the layers found in only one model, and how
    the model was tapped (``view``: ops rewritten into their un-fused form, weighted ops left untapped)."""

    layers: list[LayerError]
    unmatched: list[str]
    view: dict[str, object]


class _Tapped:
    """An ONNX model run in ONNX Runtime with its weighted layers' outputs exposed (on its un-fused view)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        from compress.export.qdq import Graph
        from compress.sparsity.verify import _weight_source, layer_name

        try:
            model = onnx.load(os.fspath(path))
        except Exception as exc:  # DecodeError, OSError...: a damaged file
            raise CompressError(f"{path}: is not a readable ONNX model ({first_line(exc)})") from None
        self.rewritten = sorted(n.op_type for n in model.graph.node if n.op_type in UNFUSED)
        self.untapped = untapped_ops(model)
        try:
            model, _ = unfuse(model)
        except ValueError as exc:
            raise CompressError(f"{path}: {exc}") from None
        graph = Graph(model)
        self.tensor: dict[str, str] = {}  # layer -> output tensor
        self.order: list[str] = []
        for node in model.graph.node:
            if node.op_type in TAPPABLE and len(node.input) >= 2:
                name = layer_name(node, _weight_source(graph, node.input[1]))
                if name not in self.tensor:
                    self.tensor[name] = node.output[0]
                    self.order.append(name)
        self.feeds = _feeding_layers(model, self.tensor)
        outputs = {o.name for o in model.graph.output}
        for tensor in self.tensor.values():
            if tensor not in outputs:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tapped tensor
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT rejects a graph it cannot run
            raise CompressError(f"{path}: ONNX Runtime cannot run it ({first_line(exc)})") from None
        self.input = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]

    def view(self) -> dict[str, object]:
        """What the taps ran on: ops rewritten into plain ONNX ops, weighted ops no tap reads."""
        counts = {op: self.rewritten.count(op) for op in sorted(set(self.rewritten))}
        return {"unfused": counts, "untapped": self.untapped, "optimization": "disabled"}

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        values = dict(zip(self.names, self.session.run(None, {self.input: x}), strict=True))
        return {layer: values[tensor] for layer, tensor in self.tensor.items()}


def _feeding_layers(model: onnx.ModelProto, tensors: dict[str, str]) -> dict[str, list[str]]:
    """Per layer, the nearest weighted layers upstream of it (through any non-weighted ops)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    layer_of = {t: layer for layer, t in tensors.items()}
    feeds: dict[str, list[str]] = {}
    for layer, tensor in tensors.items():
        node = producer[tensor]
        found: list[str] = []
        stack, seen = [i for i in node.input[:1]], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in layer_of:
                found.append(layer_of[name])
                continue
            up = producer.get(name)
            if up is not None:
                stack.extend(up.input)
        feeds[layer] = sorted(set(found))
    return feeds


def _as_onnx(reference: nn.Module | str | os.PathLike[str], example: torch.Tensor, folder: Path,
             trust: Sequence[str] = ()) -> Path:
    if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".onnx":
        return Path(reference)
    from compress.export.onnx import export_onnx
    from compress.models import load_model
    from compress.quant import target_of

    model = reference if isinstance(reference, nn.Module) else load_model(reference, trust=trust)
    path = folder / "reference.onnx"
    target = target_of(model)
    export_onnx(model, example, path, **({"target": target} if target is not None else {}))
    return path


def localize(
    model: str | os.PathLike[str],
    reference: nn.Module | str | os.PathLike[str],
    batches: Iterable[torch.Tensor],
    *,
    limit: int = 256,
    trust: Sequence[str] = (),
) -> Localization:
    """Per-layer errors of ONNX ``model`` against ``reference`` (ONNX, compress checkpoint or module).

    Raises:
        CompressError: a model cannot be read or run.
    """
    batches = iter(batches)
    first = next(batches)
    with tempfile.TemporaryDirectory() as tmp:
        ours = _Tapped(Path(model))
        theirs = _Tapped(_as_onnx(reference, first[:1], Path(tmp), trust))
    shared = [layer for layer in ours.order if layer in theirs.tensor]
    unmatched = sorted(set(ours.order) ^ set(theirs.order))
    diff = {layer: 0.0 for layer in shared}
    norm = {layer: 0.0 for layer in shared}
    seen = 0
    for batch in [first, *batches]:
        x = batch.detach().cpu().numpy().astype(np.float32)
        a, b = ours(x), theirs(x)
        for layer in list(shared):
            if a[layer].shape != b[layer].shape:  # e.g. a pruned layer: nothing to compare element-wise
                shared.remove(layer)
                unmatched.append(f"{layer} (shape {list(a[layer].shape[1:])} vs {list(b[layer].shape[1:])})")
                continue
            diff[layer] += float(np.square(a[layer].astype(np.float64) - b[layer]).sum())
            norm[layer] += float(np.square(b[layer].astype(np.float64)).sum())
        seen += len(x)
        if seen >= limit:
            break
    rel = {layer: (diff[layer] / norm[layer]) ** 0.5 if norm[layer] > 0 else float(diff[layer] > 0) for layer in shared}
    found = []
    for layer in shared:
        inputs = [f for f in ours.feeds.get(layer, []) if f in rel]
        upstream = max((rel[f] for f in inputs), default=0.0)
        found.append(LayerError(layer, rel[layer], rel[layer] - upstream, inputs))
    found.sort(key=lambda e: e.jump, reverse=True)
    return Localization(found, unmatched, {"model": ours.view(), "reference": theirs.view()})
