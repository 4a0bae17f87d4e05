"""Task metric (top-1) and label-free fidelity metrics against reference outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, DataError, first_line
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


def check_labels(logits: torch.Tensor, labels: torch.Tensor | None, where: str) -> None:
    """Class indices must address the model's outputs: 0..classes-1 for ``(N, classes)`` logits.

    Only integer ``(N,)`` labels against ``(N, classes)`` logits are checked (soft or absent labels pass).

    Raises:
        DataError: a label outside 0..classes-1, naming ``where``.
    """
    if labels is None or logits.ndim != 2 or labels.ndim != 1 or labels.is_floating_point():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= logits.shape[1]:
        raise DataError(f"{where}: labels range over {low}..{high} but the model outputs {logits.shape[1]} classes")


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


Runner = Callable[[torch.Tensor], torch.Tensor]


def _device_of(model: Runner) -> torch.device | None:
    if isinstance(model, nn.Module):
        return next(iter(model.parameters()), torch.empty(0)).device
    return None


@torch.no_grad()
def collect_many(runners: Sequence[Runner], batches: Iterable[Any], *, names: Sequence[str] | None = None) -> list[Outputs]:
    """Run several models over the same batches in one pass (data is read once) and gather their
    outputs and the labels on the CPU.

    Modules run in eval mode on the device of their parameters and get their mode back afterwards;
    any other tensor -> tensor callable (an engine) gets CPU inputs.

    Raises:
        CompressError: a model cannot run on the inputs (wrong shape, dtype, ...), naming it.
        DataError: there are no batches.
    """
    from compress.data import split_batch

    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(runners))]
    modes = [m.training if isinstance(m, nn.Module) else None for m in runners]
    devices = [_device_of(m) for m in runners]
    outs: list[list[torch.Tensor]] = [[] for _ in runners]
    labels: list[torch.Tensor] = []
    batches_seen = 0
    try:
        for m in runners:
            if isinstance(m, nn.Module):
                m.eval()
        for batch in batches:
            x, y = split_batch(batch)
            for i, (model, device) in enumerate(zip(runners, devices, strict=True)):
                try:
                    out = model(x.to(device) if device is not None else x)
                except CompressError:
                    raise
                except Exception as exc:  # the model and the data do not fit together: bad input
                    raise CompressError(
                        f"{names[i]} cannot run on inputs of shape {list(x.shape)}: {first_line(exc)}"
                    ) from None
                if isinstance(out, (tuple, list)):
                    out = out[0]
                outs[i].append(out.detach().float().cpu())
            if isinstance(y, torch.Tensor):
                labels.append(y.cpu())
            batches_seen += 1
    finally:
        for m, mode in zip(runners, modes, strict=True):
            if isinstance(m, nn.Module):
                m.train(mode)
    if not batches_seen:
        raise DataError("no batches to evaluate")
    label = torch.cat(labels) if len(labels) == batches_seen else None
    return [Outputs(torch.cat(o), label) for o in outs]


def collect(model: Runner, batches: Iterable[Any], *, name: str = "model") -> Outputs:
    """:func:`collect_many` for one model."""
    return collect_many([model], batches, names=[name])[0]


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
        try:
            result[metric] = float(fn(outputs.logits, outputs.labels))
        except Exception as exc:  # a user's metric: report its failure as bad input, naming it
            raise CompressError(f"metric '{metric}' failed: {first_line(exc)}") from None
    for key, value in fid.items():
        result.setdefault(key, value)
    return result
