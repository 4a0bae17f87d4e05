"""Task metrics (top-1, segmentation) and label-free fidelity metrics against reference outputs.

Models may return several outputs (see :mod:`compress.outputs`): :class:`Outputs` keeps each by name;
the task metric applies to the task output, fidelity can be had per output (:func:`fidelity_all`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    Dim,
    attention_mask,
    class_dim,
    lengths,
    pad_cat,
    resolve_dim,
    valid_positions,
)
from compress.task_metrics import TASK, check_labels, miou, pixel_accuracy, top1  # noqa: F401 (public here too)

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


def predictions(outputs: torch.Tensor, dim: Dim = "auto") -> torch.Tensor:
    """Arg-max over the class axis ``dim`` (see :mod:`compress.positions`): per sample ``[N]``, per position
    ``[N, H, W]`` for ``[N, C, H, W]`` or ``[N, T]`` for ``[N, T, C]``; ``dim`` None: over the whole sample."""
    dim = resolve_dim(outputs, dim)
    if dim is None:
        return outputs.reshape(len(outputs), -1).argmax(1)
    return outputs.argmax(dim)


def counted(outputs: torch.Tensor, dim: Dim = "auto", valid: torch.Tensor | None = None) -> torch.Tensor:
    """The values of the positions ``valid`` keeps, ``[positions, classes]`` (all of ``outputs`` without ``valid``)."""
    dim = resolve_dim(outputs, dim)
    if valid is None or dim is None:
        return outputs
    return outputs.movedim(dim, -1)[valid]


def fidelity(outputs: torch.Tensor, reference: torch.Tensor, dim: Dim = "auto",
             valid: torch.Tensor | None = None) -> dict[str, float]:
    """Agreement of arg-max (per position for per-position outputs, see :mod:`compress.positions`), mean
    per-sample cosine, max and mean absolute error vs ``reference``, over the positions ``valid`` keeps."""
    if outputs.shape != reference.shape:
        raise CompressError(f"outputs of shape {list(outputs.shape)} cannot be compared with reference {list(reference.shape)}")
    dim = resolve_dim(outputs, dim)
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


def alongside(outputs: Outputs, tensor: torch.Tensor, labels: torch.Tensor | None) -> Outputs:
    """Outputs saved from the same inputs as ``outputs``' task output (a saved reference file's), under its name
    and with its layout (class axis, positions that count), which the saved file does not record."""
    name = outputs.task_name
    valid = {name: outputs.valid[name]} if name in outputs.valid else {}
    return Outputs({name: tensor}, labels, name, {name: outputs.class_dims[name]}, valid)


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
