"""A model's inputs as batches carry them: one tensor, a tuple of tensors, or a dict of named tensors.

Image models take one tensor (``model(x)``); text models take token ids and an attention mask, as a tuple
(``model(ids, mask)``) or by name (``model(input_ids=..., attention_mask=...)``, as Hugging Face models do).
Everything that feeds a model (evaluation, fine-tuning, calibration, export, engines) goes through these
functions, so every layout works everywhere; integer tensors (token ids, masks) keep their dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import nn

from compress.errors import DataError

Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]  # noqa: UP007 (a runtime alias)

DEFAULT_NAME = "input"  # the ONNX input name of a single-tensor model (what exported files have always used)


def is_inputs(value: Any) -> bool:
    """Whether ``value`` is one of the three layouts (tensors only)."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return bool(value) and all(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    return False


def normalize(value: Any, where: str = "inputs") -> Inputs:
    """``value`` as :data:`Inputs` (a list becomes a tuple).

    Raises:
        DataError: not a tensor, a non-empty tuple/list of tensors, or a dict of tensors by name.
    """
    if not is_inputs(value):
        raise DataError(f"{where}: model inputs must be a tensor, a tuple of tensors or a dict of tensors by name, "
                        f"not {type(value).__name__}")
    return tuple(value) if isinstance(value, list) else value


def tensors(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors in order (dict: insertion order)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


def names(inputs: Inputs) -> list[str]:
    """ONNX input names: ``input`` for one tensor, ``input0``, ``input1``, ... for a tuple, the keys of a dict."""
    if isinstance(inputs, torch.Tensor):
        return [DEFAULT_NAME]
    if isinstance(inputs, dict):
        return list(inputs)
    return [f"{DEFAULT_NAME}{i}" for i in range(len(inputs))]


def apply(inputs: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` on every tensor, keeping the layout."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, dict):
        return {k: fn(v) for k, v in inputs.items()}
    return tuple(fn(v) for v in inputs)


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    return apply(inputs, lambda t: t.to(device))


def batch_size(inputs: Inputs) -> int:
    """The leading dimension, which every tensor must share."""
    sizes = {int(t.shape[0]) if t.dim() else 0 for t in tensors(inputs)}
    if len(sizes) != 1:
        raise DataError(f"model inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def take(inputs: Inputs, index: slice | torch.Tensor) -> Inputs:
    """The samples at ``index`` (along the batch dimension) of every tensor."""
    return apply(inputs, lambda t: t[index])


def repeat_first(inputs: Inputs, batch: int) -> Inputs:
    """The first sample of every input tensor repeated ``batch`` times (its dtype and values kept): a batch to time."""
    return apply(inputs, lambda t: t[:1].detach().cpu().expand(batch, *t.shape[1:]).contiguous())


def concat(parts: Sequence[Inputs]) -> Inputs:
    """Batches joined along the batch dimension (all of one layout)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))  # type: ignore[arg-type]
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))  # type: ignore[index]


def call_model(model: nn.Module | Callable[..., Any], inputs: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


def export_args(inputs: Inputs) -> tuple[Any, ...]:
    """``args`` for ``torch.onnx.export``: positional tensors, or a trailing dict of keyword tensors."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, dict):
        return (dict(inputs),)  # the TorchScript exporter takes a trailing dict as keyword arguments
    return tuple(inputs)


def signature(inputs: Inputs) -> str:
    """What must agree between data splits: per input its name, dtype and per-sample shape (token inputs: the
    number of dims only, as batches may pad to different lengths)."""
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        return str(list(inputs.shape[1:]))
    return ", ".join(f"{n} {list(t.shape[1:]) if t.is_floating_point() else f'{t.dim()}-d'} {str(t.dtype).removeprefix('torch.')}"
                     for n, t in zip(names(inputs), tensors(inputs), strict=True))


def describe_inputs(inputs: Inputs) -> str:
    """``[1, 1, 8, 8]`` for one tensor; ``input_ids [1, 32] int64, attention_mask [1, 32] int64`` otherwise."""
    if isinstance(inputs, torch.Tensor):
        return str(list(inputs.shape))
    return ", ".join(f"{n} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                     for n, t in zip(names(inputs), tensors(inputs), strict=True))
