"""Task metrics (top-1, segmentation) and label-free fidelity metrics against reference outputs.

Models may return several outputs (see :mod:`compress.outputs`): :class:`Outputs` keeps each by name;
the task metric applies to the task output, fidelity can be had per output (:func:`fidelity_all`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from pydantic import field_validator, model_serializer, model_validator
from torch import nn

from compress.config import Strict
from compress.data import split_batch
from compress.errors import CompressError, DataError, first_line
from compress.imports import check_reference, resolve
from compress.inputs import call_model, describe_inputs, move_inputs
from compress.outputs import SINGLE, describe, named, require_task, task_output
from compress.positions import (
    IGNORE_INDEX,
    attention_mask,
    class_dim,
    default_class_dim,
    lengths,
    pad_cat,
    valid_positions,
)

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


Dim = Union[int, None, Literal["auto"]]  # noqa: UP007 (a runtime alias) the class axis; "auto": by rank


def _dim(outputs: torch.Tensor, dim: Dim) -> int | None:
    return default_class_dim(outputs.ndim) if dim == "auto" else dim


def _per_position(outputs: torch.Tensor, labels: torch.Tensor, dim: int | None, valid: torch.Tensor | None,
                  name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(predicted classes, labels, classes)`` of the positions that count, flattened: those ``valid`` keeps
    whose label is a class (an ignore index, -100 or 255, is left out)."""
    if dim is None or outputs.ndim < 3 or labels.shape != (*outputs.shape[:dim], *outputs.shape[dim + 1:]):
        raise DataError(f"{name} needs (N, classes, H, W) outputs and (N, H, W) labels (or (N, T, classes) and "
                        f"(N, T)), got {list(outputs.shape)} and {list(labels.shape)}")
    classes = outputs.shape[dim]
    keep = (labels >= 0) & (labels < classes)
    if valid is not None:
        keep &= valid
    return outputs.argmax(dim)[keep], labels[keep].long(), classes


def top1(outputs: torch.Tensor, labels: torch.Tensor, dim: Dim = "auto", valid: torch.Tensor | None = None) -> float:
    """Fraction of samples whose arg-max output equals the label; for per-position outputs (``dim``: the
    class axis, see :mod:`compress.positions`) the fraction of positions, as :func:`pixel_accuracy`."""
    dim = _dim(outputs, dim)
    if dim is not None and outputs.ndim > 2:
        return pixel_accuracy(outputs, labels, dim, valid)
    if outputs.ndim != 2 or labels.ndim != 1 or len(outputs) != len(labels):
        raise DataError(f"top1 needs (N, classes) outputs and N labels, got {list(outputs.shape)} and {list(labels.shape)}")
    return float((outputs.argmax(1) == labels).float().mean())


def pixel_accuracy(outputs: torch.Tensor, labels: torch.Tensor, dim: Dim = "auto",
                   valid: torch.Tensor | None = None) -> float:
    """Fraction of positions (pixels, tokens) whose arg-max over classes equals the label (positions labelled
    outside 0..classes-1, an ignore index such as 255 or -100, are left out here and in :func:`miou`, as are
    those ``valid`` marks False: padding, a zero attention mask).

    Raises:
        DataError: labels not of the positions' shape, or no position with a label.
    """
    pred, labels, _ = _per_position(outputs, labels, _dim(outputs, dim), valid, "pixel_accuracy")
    if not labels.numel():
        raise DataError("pixel_accuracy: no position has a label in 0..classes-1")
    return float((pred == labels).double().mean())


def miou(outputs: torch.Tensor, labels: torch.Tensor, dim: Dim = "auto", valid: torch.Tensor | None = None) -> float:
    """Mean intersection over union of the arg-max classes, over the classes present in the labels or
    the predictions (a class absent from both has no IoU and is left out); positions as :func:`pixel_accuracy`."""
    pred, labels, classes = _per_position(outputs, labels, _dim(outputs, dim), valid, "miou")
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


def predictions(outputs: torch.Tensor, dim: Dim = "auto") -> torch.Tensor:
    """Arg-max over the class axis ``dim`` (see :mod:`compress.positions`): per sample ``[N]``, per position
    ``[N, H, W]`` for ``[N, C, H, W]`` or ``[N, T]`` for ``[N, T, C]``; ``dim`` None: over the whole sample."""
    dim = _dim(outputs, dim)
    if dim is None:
        return outputs.reshape(len(outputs), -1).argmax(1)
    return outputs.argmax(dim)


def counted(outputs: torch.Tensor, dim: Dim = "auto", valid: torch.Tensor | None = None) -> torch.Tensor:
    """The values of the positions ``valid`` keeps, ``[positions, classes]`` (all of ``outputs`` without ``valid``)."""
    dim = _dim(outputs, dim)
    if valid is None or dim is None:
        return outputs
    return outputs.movedim(dim, -1)[valid]


def fidelity(outputs: torch.Tensor, reference: torch.Tensor, dim: Dim = "auto",
             valid: torch.Tensor | None = None) -> dict[str, float]:
    """Agreement of arg-max (per position for per-position outputs, see :mod:`compress.positions`), mean
    per-sample cosine, max and mean absolute error vs ``reference``, over the positions ``valid`` keeps."""
    if outputs.shape != reference.shape:
        raise CompressError(f"outputs of shape {list(outputs.shape)} cannot be compared with reference {list(reference.shape)}")
    dim = _dim(outputs, dim)
    same = predictions(outputs, dim) == predictions(reference, dim)
    if valid is not None and dim is not None:
        same = same[valid]
        keep = valid.unsqueeze(dim)  # positions left out count as equal zeros in the cosine
        outputs, reference = outputs.where(keep, 0.0), reference.where(keep, 0.0)
    a = outputs.reshape(len(outputs), -1).double()
    b = reference.reshape(len(reference), -1).double()
    diff = (counted(outputs, dim, valid) - counted(reference, dim, valid)).double().abs()
    return {
        "agreement": float(same.double().mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean()),
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "mean_abs": float(diff.mean()) if diff.numel() else 0.0,
    }


@dataclass
class Outputs:
    """A model's outputs over a split (on the CPU) by name, with the labels if the data has them, and
    the name of the task output (None: several outputs and none named; see :mod:`compress.outputs`).
    A bare tensor stands for a single output named ``output``.

    ``class_dims``: each output's class axis (see :mod:`compress.positions`; missing ones follow the rule
    with the labels as the only lengths). ``valid``: for per-position outputs, the positions that count
    (``[N, positions]`` bool: not padding, attention mask 1); a missing entry counts every position.
    """

    tensors: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    task: str | None = SINGLE
    class_dims: dict[str, int | None] = field(default_factory=dict)
    valid: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.tensors, torch.Tensor):
            self.tensors = {SINGLE: self.tensors}
        if self.task is not None and self.task not in self.tensors:
            self.task = task_output(list(self.tensors))
        found = {int(self.labels.shape[1])} if isinstance(self.labels, torch.Tensor) and self.labels.dim() == 2 else set()
        for name, t in self.tensors.items():
            if name not in self.class_dims:
                self.class_dims[name] = class_dim([t.shape], [found], name)

    @property
    def task_name(self) -> str:
        """The task output's name.

        Raises:
            CompressError: several outputs and none named (the message lists them).
        """
        return require_task(self.names, self.task)

    @property
    def logits(self) -> torch.Tensor:
        """The task output (see :attr:`task_name`)."""
        return self.tensors[self.task_name]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def layout(self, name: str) -> tuple[int | None, torch.Tensor | None]:
        """``(class axis, positions that count)`` of output ``name``."""
        return self.class_dims[name], self.valid.get(name)


def pair_outputs(outputs: Outputs, reference: Outputs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, output, reference output)`` for every output: matched by name, or the one output of each
    (named as ``outputs`` names it).

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


def task_pair(outputs: Outputs, reference: Outputs) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The task output's entry of :func:`pair_outputs` (the one pair when each has one output).

    Raises:
        CompressError: the two return different outputs, or several and none is named.
    """
    pairs = pair_outputs(outputs, reference)
    if len(pairs) == 1:
        return pairs[0]
    name = outputs.task_name
    return next(p for p in pairs if p[0] == name)


def fidelity_all(outputs: Outputs, reference: Outputs) -> dict[str, dict[str, float]]:
    """:func:`fidelity` of every output (see :func:`pair_outputs`), by name, each on its own layout."""
    return {name: fidelity(a, b, *outputs.layout(name)) for name, a, b in pair_outputs(outputs, reference)}


def task_fidelity(outputs: Outputs, reference: Outputs) -> dict[str, float]:
    """:func:`fidelity` of the task output (see :func:`task_pair`)."""
    name, a, b = task_pair(outputs, reference)
    return fidelity(a, b, *outputs.layout(name))


Runner = Callable[[Any], Any]  # inputs (see compress.inputs) -> a tensor, or several outputs (see compress.outputs)


def _device_of(model: Runner) -> torch.device | None:
    if isinstance(model, nn.Module):
        return next(iter(model.parameters()), torch.empty(0)).device
    return None


@dataclass
class _Seen:
    """What every model shares per batch: labels, sequence lengths, attention mask (see :mod:`compress.positions`)."""

    labels: list[torch.Tensor | None] = field(default_factory=list)
    lengths: list[set[int]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def add(self, x: Any, y: Any) -> None:
        label = y.cpu() if isinstance(y, torch.Tensor) else None
        self.labels.append(label)
        self.lengths.append(lengths(x, label))
        self.masks.append(attention_mask(x))

    def label(self) -> torch.Tensor | None:
        """The labels joined; per-position labels of batches padded to different lengths are padded with -100."""
        if not self.labels or any(y is None for y in self.labels):
            return None
        parts: list[torch.Tensor] = self.labels  # type: ignore[assignment]
        fill = 0.0 if parts[0].is_floating_point() else IGNORE_INDEX
        return pad_cat(parts, fill, None, "labels")


def _run(model: Runner, device: torch.device | None, x: Any, name: str) -> dict[str, torch.Tensor]:
    """``model``'s outputs on ``x`` by name; a module gets ``model(x)``/``model(*x)``/``model(**x)`` on its
    device, an engine the inputs as they are."""
    try:
        out = call_model(model, move_inputs(x, device)) if device is not None else model(x)
    except CompressError:
        raise
    except Exception as exc:  # the model and the data do not fit together: bad input
        raise CompressError(f"{name} cannot run on inputs of shape {describe_inputs(x)}: {first_line(exc)}") from None
    try:
        return named(out)
    except CompressError as exc:
        raise CompressError(f"{name}: {exc}") from None


def _assemble(parts: dict[str, list[torch.Tensor]], seen: _Seen, name: str, output: str | None) -> Outputs:
    """One model's batches as :class:`Outputs`: per-position outputs padded to the longest batch, the padding
    and the attention mask's zeros marked as not counting."""
    try:
        task = task_output(list(parts), output)
        dims = {key: class_dim([t.shape for t in ts], seen.lengths, key) for key, ts in parts.items()}
    except CompressError as exc:
        raise CompressError(f"{name}: {exc}") from None
    tensors, valid = {}, {}
    for key, ts in parts.items():
        where = f"{name}: output '{key}'"
        tensors[key] = pad_cat(ts, 0.0, dims[key], where)
        masks = [valid_positions(t, dims[key], m) for t, m in zip(ts, seen.masks, strict=True)]
        if masks[0] is not None:
            keep = pad_cat([m.to(torch.uint8) for m in masks], 0, None, where).bool()  # type: ignore[union-attr]
            if not bool(keep.all()):
                valid[key] = keep
    return Outputs(tensors, seen.label(), task, dims, valid)


@torch.no_grad()
def collect_many(runners: Sequence[Runner], batches: Iterable[Any], *, names: Sequence[str] | None = None,
                 output: str | None = None) -> list[Outputs]:
    """Run several models over the same batches in one pass (data is read once) and gather their
    outputs (every one, by name: see :mod:`compress.outputs`) and the labels on the CPU.

    Modules run in eval mode on the device of their parameters and get their mode back afterwards;
    any other tensor -> tensor callable (an engine) gets CPU inputs. Batches padded to different sequence
    lengths (dynamic padding) are joined by padding every batch's per-position outputs to the longest with
    zeros and its per-position labels with -100; :attr:`Outputs.valid` marks the padding (and the attention
    mask's zeros) so that no metric counts it (see :mod:`compress.positions`).

    Args:
        output: the task output's name (None: the rule of :func:`compress.outputs.task_output`).

    Raises:
        CompressError: a model cannot run on the inputs (wrong shape, dtype, ...) or returns something
            other than tensors, or ``output`` is not one of its outputs, naming the model.
        DataError: there are no batches.
    """
    names = list(names) if names is not None else [f"model {i + 1}" for i in range(len(runners))]
    modes = [m.training if isinstance(m, nn.Module) else None for m in runners]
    devices = [_device_of(m) for m in runners]
    outs: list[dict[str, list[torch.Tensor]]] = [{} for _ in runners]
    seen = _Seen()
    try:
        for m in runners:
            if isinstance(m, nn.Module):
                m.eval()
        for batch in batches:
            x, y = split_batch(batch)
            for model, device, name, parts in zip(runners, devices, names, outs, strict=True):
                tensors = _run(model, device, x, name)
                if seen.labels and list(tensors) != list(parts):
                    raise CompressError(f"{name}: returns outputs {describe(list(tensors))} on one batch and "
                                        f"{describe(list(parts))} on another")
                for key, tensor in tensors.items():
                    parts.setdefault(key, []).append(tensor.detach().float().cpu())
            seen.add(x, y)
    finally:
        for m, mode in zip(runners, modes, strict=True):
            if isinstance(m, nn.Module):
                m.train(mode)
    if not seen.labels:
        raise DataError("no batches to evaluate")
    return [_assemble(parts, seen, name, output) for name, parts in zip(names, outs, strict=True)]


def collect(model: Runner, batches: Iterable[Any], *, name: str = "model", output: str | None = None) -> Outputs:
    """:func:`collect_many` for one model."""
    return collect_many([model], batches, names=[name], output=output)[0]


def score(metric: str, outputs: Outputs, reference: Outputs | None = None) -> dict[str, float]:
    """Every metric that applies: the task metric ``metric`` first, then fidelity vs ``reference``.

    Fidelity is that of the task output (:func:`fidelity_all` has every output's). Per-position outputs are
    scored per position (see :mod:`compress.positions`); a user's ``module:callable`` gets the task output and
    the labels as they are (padded positions hold zeros and label -100).

    Raises:
        DataError: a task metric is asked for but the data has no labels.
    """
    result: dict[str, float] = {}
    fid = task_fidelity(outputs, reference) if reference is not None else {}
    if metric in TASK:
        if outputs.labels is None:
            raise DataError(f"metric {metric} needs labels but the eval data has none; use metric: agreement")
        result[metric] = TASK[metric](outputs.logits, outputs.labels, *outputs.layout(outputs.task_name))
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
