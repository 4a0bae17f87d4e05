"""Task metrics (top-1, segmentation) and label-free fidelity metrics against reference outputs.

Models may return several outputs (see :mod:`compress.outputs`): :class:`Outputs` keeps each by name;
the task metric applies to the task output, fidelity can be had per output (:func:`fidelity_all`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import field_validator, model_serializer, model_validator
from torch import nn

from compress.config import Strict
from compress.errors import CompressError, DataError, first_line
from compress.imports import check_reference, resolve
from compress.inputs import call_model, describe_inputs, move_inputs
from compress.outputs import SINGLE, describe, named, task_output, unnamed

LABEL_FREE = ("agreement", "cosine")
SEGMENTATION = ("pixel_accuracy", "miou")  # labels [N, H, W] against outputs [N, classes, H, W]
BUILTIN = ("top1", *SEGMENTATION, *LABEL_FREE)


def check_metric_name(name: str) -> str:
    """Accept a built-in metric name or a ``module:callable`` reference; raise ``ValueError`` otherwise."""
    if name in BUILTIN:
        return name
    if ":" in name:
        return check_reference(name)
    raise ValueError(f"unknown metric '{name}' ({', '.join(BUILTIN)}, or module:callable)")


class MetricSpec(Strict):
    """The recipe's ``metric``: a name (``metric: top1``) or ``{name: top1, output: logits}``, which
    names the model output the task metric applies to (see :mod:`compress.outputs` for the default)."""

    name: str = "top1"
    output: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": check_metric_name(data)} if isinstance(data, str) else data  # errors name `metric`

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_metric_name(v)

    @model_serializer(mode="plain")
    def _dump(self) -> str | dict[str, str]:  # the short form when no output is named: recipes read back alike
        return self.name if self.output is None else {"name": self.name, "output": self.output}


def top1(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose arg-max output equals the label."""
    if outputs.ndim != 2 or labels.ndim != 1 or len(outputs) != len(labels):
        raise DataError(f"top1 needs (N, classes) outputs and N labels, got {list(outputs.shape)} and {list(labels.shape)}")
    return float((outputs.argmax(1) == labels).float().mean())


def _segmentation(outputs: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if outputs.ndim != 4 or labels.shape != (outputs.shape[0], *outputs.shape[2:]):
        raise DataError(f"{name} needs (N, classes, H, W) outputs and (N, H, W) labels, got {list(outputs.shape)} "
                        f"and {list(labels.shape)}")
    return outputs.argmax(1), labels


def pixel_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of pixels whose arg-max over classes (dim 1) equals the label (pixels labelled outside
    0..classes-1, an ignore index such as 255, are left out here and in :func:`miou`)."""
    pred, labels = _segmentation(outputs, labels, "pixel_accuracy")
    valid = (labels >= 0) & (labels < outputs.shape[1])
    return float((pred[valid] == labels[valid]).double().mean())


def miou(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean intersection over union of the arg-max classes, over the classes present in the labels or
    the predictions (a class absent from both has no IoU and is left out)."""
    pred, labels = _segmentation(outputs, labels, "miou")
    classes = outputs.shape[1]
    valid = (labels >= 0) & (labels < classes)
    pred, labels = pred[valid].long(), labels[valid].long()
    bins = torch.bincount(labels * classes + pred, minlength=classes * classes).reshape(classes, classes).double()
    inter = bins.diagonal()
    union = bins.sum(0) + bins.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


TASK = {"top1": top1, "pixel_accuracy": pixel_accuracy, "miou": miou}


def check_labels(logits: torch.Tensor, labels: torch.Tensor | None, where: str) -> None:
    """Class indices must address the model's outputs: 0..classes-1 for ``(N, classes)`` logits.

    Only integer ``(N,)`` labels against ``(N, classes)`` logits are checked (soft or absent labels pass).

    Raises:
        DataError: a label outside 0..classes-1, naming ``where``.
    """
    if labels is None or labels.is_floating_point() or not labels.numel():
        return
    if not (logits.ndim == 2 and labels.ndim == 1) and not (logits.ndim == 4 and labels.ndim == 3):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= logits.shape[1]:
        raise DataError(f"{where}: labels range over {low}..{high} but the model outputs {logits.shape[1]} classes")


def predictions(outputs: torch.Tensor) -> torch.Tensor:
    """Arg-max per sample ``[N]``, or per pixel ``[N, H, W]`` for ``[N, C, H, W]`` outputs (over C)."""
    if outputs.ndim == 4:
        return outputs.argmax(1)
    return outputs.reshape(len(outputs), -1).argmax(1)


def fidelity(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Agreement of arg-max (per pixel for ``[N, C, H, W]``), mean per-sample cosine, max and mean
    absolute error vs ``reference``."""
    if outputs.shape != reference.shape:
        raise CompressError(f"outputs of shape {list(outputs.shape)} cannot be compared with reference {list(reference.shape)}")
    a = outputs.reshape(len(outputs), -1).double()
    b = reference.reshape(len(reference), -1).double()
    diff = (a - b).abs()
    return {
        "agreement": float((predictions(outputs) == predictions(reference)).double().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean()),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
    }


@dataclass
class Outputs:
    """A model's outputs over a split (on the CPU) by name, with the labels if the data has them, and
    the name of the task output (None: several outputs and none named; see :mod:`compress.outputs`).
    A bare tensor stands for a single output named ``output``."""

    tensors: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    task: str | None = SINGLE

    def __post_init__(self) -> None:
        if isinstance(self.tensors, torch.Tensor):
            self.tensors = {SINGLE: self.tensors}
        if self.task is not None and self.task not in self.tensors:
            self.task = task_output(list(self.tensors))

    @property
    def logits(self) -> torch.Tensor:
        """The task output.

        Raises:
            CompressError: several outputs and none named (the message lists them).
        """
        if self.task is None:
            raise CompressError(unnamed(list(self.tensors)))
        return self.tensors[self.task]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)


def pair_outputs(outputs: Outputs, reference: Outputs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, output, reference output)`` for every output: matched by name, or the one output of each.

    Raises:
        CompressError: the two return different outputs.
    """
    if len(outputs.tensors) == 1 and len(reference.tensors) == 1:
        ((name, a),), ((_, b),) = outputs.tensors.items(), reference.tensors.items()
        return [(name, a, b)]
    if set(outputs.tensors) != set(reference.tensors):
        raise CompressError(f"the model returns outputs {describe(outputs.names)} but the reference "
                            f"{describe(reference.names)}; they cannot be compared")
    return [(name, t, reference.tensors[name]) for name, t in outputs.tensors.items()]


def fidelity_all(outputs: Outputs, reference: Outputs) -> dict[str, dict[str, float]]:
    """:func:`fidelity` of every output (see :func:`pair_outputs`), by name."""
    return {name: fidelity(a, b) for name, a, b in pair_outputs(outputs, reference)}


Runner = Callable[[Any], Any]  # inputs (see compress.inputs) -> a tensor, or several outputs (see compress.outputs)


def _device_of(model: Runner) -> torch.device | None:
    if isinstance(model, nn.Module):
        return next(iter(model.parameters()), torch.empty(0)).device
    return None


@torch.no_grad()
def collect_many(runners: Sequence[Runner], batches: Iterable[Any], *, names: Sequence[str] | None = None,
                 output: str | None = None) -> list[Outputs]:
    """Run several models over the same batches in one pass (data is read once) and gather their
    outputs (every one, by name: see :mod:`compress.outputs`) and the labels on the CPU.

    Modules run in eval mode on the device of their parameters and get their mode back afterwards;
    any other tensor -> tensor callable (an engine) gets CPU inputs.

    Args:
        output: the task output's name (None: the rule of :func:`compress.outputs.task_output`).

    Raises:
        CompressError: a model cannot run on the inputs (wrong shape, dtype, ...) or returns something
            other than tensors, or ``output`` is not one of its outputs, naming the model.
        DataError: there are no batches.
    """
    from compress.data import split_batch

    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(runners))]
    modes = [m.training if isinstance(m, nn.Module) else None for m in runners]
    devices = [_device_of(m) for m in runners]
    outs: list[dict[str, list[torch.Tensor]]] = [{} for _ in runners]
    labels: list[torch.Tensor] = []
    batches_seen = 0
    try:
        for m in runners:
            if isinstance(m, nn.Module):
                m.eval()
        for batch in batches:
            x, y = split_batch(batch)
            for i, (model, device) in enumerate(zip(runners, devices, strict=True)):
                try:  # a module gets model(x) / model(*x) / model(**x); an engine takes the inputs as they are
                    out = call_model(model, move_inputs(x, device)) if device is not None else model(x)
                except CompressError:
                    raise
                except Exception as exc:  # the model and the data do not fit together: bad input
                    raise CompressError(
                        f"{names[i]} cannot run on inputs of shape {describe_inputs(x)}: {first_line(exc)}"
                    ) from None
                try:
                    tensors = named(out)
                except CompressError as exc:
                    raise CompressError(f"{names[i]}: {exc}") from None
                if batches_seen and list(tensors) != list(outs[i]):
                    raise CompressError(f"{names[i]}: returns outputs {describe(list(tensors))} on one batch and "
                                        f"{describe(list(outs[i]))} on another")
                for key, tensor in tensors.items():
                    outs[i].setdefault(key, []).append(tensor.detach().float().cpu())
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
    result = []
    for name, o in zip(names, outs, strict=True):
        try:
            task = task_output(list(o), output)
        except CompressError as exc:
            raise CompressError(f"{name}: {exc}") from None
        result.append(Outputs({key: torch.cat(parts) for key, parts in o.items()}, label, task))
    return result


def collect(model: Runner, batches: Iterable[Any], *, name: str = "model", output: str | None = None) -> Outputs:
    """:func:`collect_many` for one model."""
    return collect_many([model], batches, names=[name], output=output)[0]


def score(metric: str, outputs: Outputs, reference: Outputs | None = None) -> dict[str, float]:
    """Every metric that applies: the task metric ``metric`` first, then fidelity vs ``reference``.

    Fidelity is that of the task output (:func:`fidelity_all` has every output's).

    Raises:
        DataError: a task metric is asked for but the data has no labels.
    """
    result: dict[str, float] = {}
    fid = fidelity(outputs.logits, _same_output(outputs, reference)) if reference is not None else {}
    if metric in TASK:
        if outputs.labels is None:
            raise DataError(f"metric {metric} needs labels but the eval data has none; use metric: agreement")
        result[metric] = TASK[metric](outputs.logits, outputs.labels)
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


def _same_output(outputs: Outputs, reference: Outputs) -> torch.Tensor:
    """The reference's tensor for ``outputs``' task output (the one output of each when both have one)."""
    for name, _, ref in pair_outputs(outputs, reference):
        if name == outputs.task or len(outputs.tensors) == 1:
            return ref
    raise CompressError(unnamed(outputs.names))
