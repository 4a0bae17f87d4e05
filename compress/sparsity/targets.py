"""What a 2:4 mask entry names: a Conv/Linear layer's weight, or an attention's packed q/k/v weight.

``nn.MultiheadAttention`` keeps its q, k and v projections as one ``[3E, E_in]`` parameter,
``in_proj_weight``, read through ``F.linear``. A 2:4 mask along its input dimension makes each of the
three ``[E, E_in]`` row blocks 2:4 on its own, so one mask entry, ``<attention>.in_proj_weight``,
covers all three. Once the INT8 attention rewrite (:mod:`compress.quant.attention`) has split the
attention into ``q_proj``/``k_proj``/``v_proj`` layers, the same entry binds to their weights, row
block by row block, so masks keep being applied (QAT), verified (checkpoints) and found in the ONNX
export under the layers' own names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError

IN_PROJ = "in_proj_weight"
SPLIT = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Binding:
    """One weight tensor a mask entry covers: the rows ``rows`` of the entry's mask apply to ``weight``."""

    name: str  # the layer (or packed parameter) name the weight has in the model now
    weight: torch.Tensor
    rows: slice


def _join(owner: str, leaf: str) -> str:
    return f"{owner}.{leaf}" if owner else leaf


def is_packed(name: str) -> bool:
    """Whether a mask entry names an attention's packed ``in_proj_weight`` (not a layer)."""
    return name.rpartition(".")[2] == IN_PROJ


def packed_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<attention>.in_proj_weight": weight}`` for every ``nn.MultiheadAttention`` with a packed q/k/v weight."""
    return {_join(name, IN_PROJ): m.in_proj_weight for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(m.in_proj_weight, torch.Tensor)}


def bind(model: nn.Module, name: str) -> list[Binding]:
    """The weights the mask entry ``name`` covers in ``model`` as it is now.

    Raises:
        CompressError: the model has no such layer (or attention), or its weight is gone.
    """
    if not is_packed(name):
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise CompressError(f"sparsity: the model's 2:4 masks name layer '{name}', which it no longer has") from None
        return [Binding(name, weight, slice(None))]
    owner_name = name.rpartition(".")[0]
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        raise CompressError(f"sparsity: the model's 2:4 masks name attention '{owner_name}', which it no longer "
                            "has") from None
    packed = getattr(owner, IN_PROJ, None)
    if isinstance(packed, torch.Tensor):
        return [Binding(name, packed, slice(None))]
    split = [getattr(owner, p, None) for p in SPLIT]
    if all(isinstance(getattr(p, "weight", None), torch.Tensor) for p in split):
        e = split[0].weight.shape[0]  # type: ignore[union-attr]
        return [Binding(_join(owner_name, p), layer.weight, slice(k * e, (k + 1) * e))  # type: ignore[union-attr]
                for k, (p, layer) in enumerate(zip(SPLIT, split, strict=True))]
    raise CompressError(f"sparsity: the model's 2:4 masks name '{name}', but '{owner_name}' has neither a packed "
                        "in_proj_weight nor q_proj/k_proj/v_proj layers")


def full_shape(bindings: list[Binding]) -> torch.Size:
    """The shape of the whole masked weight (the split q/k/v blocks stacked again)."""
    if len(bindings) == 1:
        return bindings[0].weight.shape
    first = bindings[0].weight.shape
    return torch.Size([sum(b.weight.shape[0] for b in bindings), *first[1:]])


def layer_names(model: nn.Module, name: str) -> list[str]:
    """The names the entry's weights go by now (one, or the three split q/k/v layers)."""
    return [b.name for b in bind(model, name)]
