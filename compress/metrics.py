"""Task metric (top-1) and label-free fidelity metrics against reference outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, DataError
from compress.imports import check_reference, resolve

LABEL_FREE = ("agreement", "cosine")
BUILTIN = ("top1", *LABEL_FREE)


def check_metric_name(name: str) -> str:
    """Accept a built-in metric name or a ``module:callable`` reference; raise ``ValueError`` otherwise."""
    if name in BUILTIN:
        return name
    if ":" in name:
        return check_reference(name)
    raise ValueError(f"unknown metric '{name}' ({', '.join(BUILTIN)}, or module:callable)")


def top1(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose arg-max output equals the label."""
    if outputs.ndim != 2 or labels.ndim != 1 or len(outputs) != len(labels):
        raise DataError(f"top1 needs (N, classes) outputs and N labels, got {list(outputs.shape)} and {list(labels.shape)}")
    return float((outputs.argmax(1) == labels).float().mean())


def fidelity(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Agreement of arg-max, mean per-sample cosine, max and mean absolute error vs ``reference``."""
    if outputs.shape != reference.shape:
        raise CompressError(f"outputs of shape {list(outputs.shape)} cannot be compared with reference {list(reference.shape)}")
    a = outputs.reshape(len(outputs), -1).double()
    b = reference.reshape(len(reference), -1).double()
    diff = (a - b).abs()
    return {
        "agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean()),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
    }


@dataclass
class Outputs:
    """A model's outputs over a split (on the CPU), with the labels if the data has them."""

    logits: torch.Tensor
    labels: torch.Tensor | None


@torch.no_grad()
def collect(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[Any],
    device: torch.device | str = "cpu",
) -> Outputs:
    """Run ``model`` (a module, in eval mode, or any tensor -> tensor callable such as an engine)
    over batches and gather its outputs and the labels on the CPU."""
    from compress.data import split_batch

    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    outs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in batches:
            x, y = split_batch(batch)
            out = model(x.to(device) if is_module else x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outs.append(out.detach().float().cpu())
            if isinstance(y, torch.Tensor):
                labels.append(y.cpu())
    finally:
        if is_module:
            model.train(was_training)
    if not outs:
        raise DataError("no batches to evaluate")
    return Outputs(torch.cat(outs), torch.cat(labels) if len(labels) == len(outs) else None)


def score(metric: str, outputs: Outputs, reference: Outputs | None = None) -> dict[str, float]:
    """Every metric that applies: the task metric ``metric`` first, then fidelity vs ``reference``.

    Raises:
        DataError: ``top1`` is asked for but the data has no labels.
    """
    result: dict[str, float] = {}
    fid = fidelity(outputs.logits, reference.logits) if reference is not None else {}
    if metric == "top1":
        if outputs.labels is None:
            raise DataError("metric top1 needs labels but the eval data has none; use metric: agreement")
        result["top1"] = top1(outputs.logits, outputs.labels)
    elif metric in LABEL_FREE:
        # Without a reference the model is its own reference (the baseline): 1.0 by definition.
        result[metric] = fid.get(metric, 1.0)
    else:
        fn: Callable[..., float] = resolve(metric, what="metric")
        result[metric] = float(fn(outputs.logits, outputs.labels))
    for key, value in fid.items():
        result.setdefault(key, value)
    return result
