"""Which layers can use sparse tensor cores, why the others cannot, and what 2:4 could save (pre-flight).

The rules follow what sparse tensor-core kernels (TensorRT, cuSPARSELt) and NVIDIA's ASP accept:
an ungrouped Conv or a Linear whose input channels are a multiple of 16 and output channels a
multiple of 8. Engines may still run a small eligible layer dense when that is faster; the
estimate below is the ceiling, not a promise.

MAC shares are of the model's true total (every convolution and matmul, :mod:`compress.profile`),
so attention's Q·Kᵀ and A·V, which have no weight to sparsify, lower the share honestly. A layer
whose weight forward reads without calling the layer (``nn.MultiheadAttention.out_proj``, used by
``F.multi_head_attention_forward``) is a layer like any other: its mask zeroes the weight that read
uses. ``MultiheadAttention.in_proj_weight``, the packed ``[3E, E]`` q/k/v weight ``F.linear`` reads, is
judged like a Linear's: a 2:4 mask along its input dimension makes each of q, k and v 2:4 (``targets``).
Other parameters read by a matmul are listed too, dense.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.profile import profile_macs
from compress.select import select_names
from compress.sparsity import targets

IN_MULTIPLE = 16
OUT_MULTIPLE = 8
SPARSE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_WEIGHTED = (*SPARSE_TYPES, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerSurvey:
    """One Conv/Linear layer (or other matmul weight): its shape, MACs per sample, why it is skipped (None: eligible)."""

    name: str
    shape: list[int]
    macs: int
    share: float  # of the model's MACs (every convolution and matmul)
    skipped: str | None = None

    def to_dict(self) -> dict[str, object]:
        entry: dict[str, object] = {"shape": self.shape, "macs": self.macs, "macs_share": round(self.share, 4)}
        if self.skipped:
            entry["skipped"] = self.skipped
        return entry


def why_ineligible(module: nn.Module) -> str | None:
    """Why sparse tensor cores cannot run this layer with a 2:4 weight, or None when they can."""
    if not isinstance(module, SPARSE_TYPES):
        return f"{type(module).__name__}: sparse kernels run Conv and Linear only"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "no weight tensor"
    groups = module.groups if isinstance(module, nn.modules.conv._ConvNd) else 1
    return shape_ineligible(weight.shape[0], weight.shape[1], groups)


def shape_ineligible(cout: int, cin: int, groups: int = 1) -> str | None:
    """The shape rule alone (a model layer or an ONNX weight ``[out, in, ...]``): why not, or None."""
    if groups != 1:
        return f"grouped conv (groups={groups})"
    if cin % IN_MULTIPLE:
        return f"input channels {cin} are not a multiple of {IN_MULTIPLE}"
    if cout % OUT_MULTIPLE:
        return f"output channels {cout} are not a multiple of {OUT_MULTIPLE}"
    return None


def survey(
    model: nn.Module,
    example: torch.Tensor | None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    where: str = "sparsity",
) -> list[LayerSurvey]:
    """Every Conv/ConvTranspose/Linear layer of ``model`` with its MAC share and eligibility.

    Attentions' packed q/k/v weights (``<attention>.in_proj_weight``) follow, judged by the same shape rule.
    With ``example``, other parameters forward reads in a matmul follow, skipped with the reason. Without
    it only shapes are judged (MACs are 0 and layers forward never uses are kept).

    Raises:
        CompressError: an include/exclude pattern matches no layer.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, _WEIGHTED) and n]
    packed = targets.packed_weights(model)
    chosen = set(select_names(names + list(packed), include, exclude, where=where, what="Conv/Linear layer to sparsify"))
    profile = profile_macs(model, example) if example is not None else None
    macs = profile.modules if profile is not None else {}
    total = max(profile.total if profile is not None else 0, 1)
    shared = _shared_weights(model, names)
    found = []
    for name in names:
        module = model.get_submodule(name)
        why = why_ineligible(module)
        if why is None and name not in chosen:
            why = "left out by include/exclude"
        if why is None and example is not None and name not in macs:
            why = "forward does not use it"
        if why is None and name in shared:
            why = f"shares its weight with '{shared[name]}'"
        found.append(LayerSurvey(name, list(module.weight.shape), macs.get(name, 0), macs.get(name, 0) / total, why))
    params = profile.params if profile is not None else {}
    for name, weight in packed.items():
        why = shape_ineligible(weight.shape[0], weight.shape[1])
        if why is None and name not in chosen:
            why = "left out by include/exclude"
        if why is None and profile is not None and name not in params:
            why = "forward does not use it"
        found.append(LayerSurvey(name, list(weight.shape), params.get(name, 0), params.get(name, 0) / total, why))
    if profile is not None:
        done = {f"{n}.weight" if n else "weight" for n in names} | set(packed)
        found += _other_weights(model, profile.params, done, total)
    return found


def _other_weights(model: nn.Module, params: dict[str, int], layer_weights: set[str], total: int) -> list[LayerSurvey]:
    """Parameters a matmul reads that are no Conv/Linear layer's weight: dense, with why."""
    found = []
    for name, macs in params.items():
        if name in layer_weights:
            continue
        owner = name.rpartition(".")[0]
        module, weight = model.get_submodule(owner), model.get_parameter(name)
        why = f"a {type(module).__name__} parameter a functional matmul reads, not a Conv/Linear layer: stays dense"
        found.append(LayerSurvey(name, list(weight.shape), macs, macs / total, why))
    return found


def _shared_weights(model: nn.Module, names: list[str]) -> dict[str, str]:
    owner: dict[int, str] = {}
    shared = {}
    for name in names:
        key = id(model.get_submodule(name).weight)
        if key in owner:
            shared[name], shared[owner[key]] = owner[key], name
        else:
            owner[key] = name
    return shared


def estimate(layers: list[LayerSurvey]) -> dict[str, object]:
    """The pre-flight summary: eligible MAC share and the best-case speedup if those layers ran 2x faster.

    The bound is Amdahl's: ``1 / (1 - share / 2)``; memory-bound layers and non-Conv/Linear ops make
    real speedups smaller. ``weightless_macs_share`` is what no weight feeds (attention's Q·Kᵀ and
    A·V): it always runs dense.
    """
    share = sum(layer.share for layer in layers if layer.skipped is None)
    return {
        "eligible_layers": sum(layer.skipped is None for layer in layers),
        "skipped_layers": sum(layer.skipped is not None for layer in layers),
        "eligible_macs_share": round(share, 4),
        "weightless_macs_share": round(max(1.0 - sum(layer.share for layer in layers), 0.0), 4),
        "best_case_speedup": round(1 / (1 - share / 2), 3),
    }
