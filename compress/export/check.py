"""Engine vs reference: task metric of both, drop in points, agreement, cosine, abs errors.

Used by the export stage (engine vs the PyTorch model it was built from) and by
``compress.check`` / ``compress check`` for any pair of models, ONNX files or engines.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from compress import metrics
from compress.errors import CompressError
from compress.export.drift import FLOAT_TOLERANCE, is_fp32, rel_error
from compress.export.model_file import ModelKind, model_kind
from compress.export.onnxruntime import Optimization, OrtEngine

Runner = Callable[[torch.Tensor], Any]  # a tensor, or several outputs (see compress.outputs)


@dataclass
class CheckResult:
    """Outcome of a check; ``passed`` is False when any threshold is exceeded (see ``failures``).

    With several outputs, ``agreement``/``cosine``/``max_abs``/``mean_abs``/``rel_error`` are the worst
    over them, ``outputs`` has each one's figures, and the task metric is ``output``'s.
    """

    passed: bool
    metric: str
    model_metric: float
    reference_metric: float
    drop: float  # percentage points: (reference - model) * 100
    drop_samples: int | None  # top1/agreement: samples lost net (lost - gained); None for other metrics
    changed: int  # samples whose arg-max differs from the reference's
    agreement: float
    cosine: float
    max_abs: float
    mean_abs: float
    rel_error: float  # max |model - reference| / rms(reference), see compress.export.drift
    samples: int
    thresholds: dict[str, float | None] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    worst: list[dict[str, Any]] = field(default_factory=list)
    output: str | None = None  # the output the task metric applies to
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # every output's fidelity, by name
    drop_unit: str = "samples"  # what drop_samples counts: tokens, pixels or positions for per-position outputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_runner(obj: nn.Module | str | os.PathLike[str] | Runner, device: torch.device | str = "cpu",
              optimization: Optimization = Optimization.all, trust: Sequence[str] = ()) -> Runner:
    """A tensor -> tensor callable for a module, an ONNX/engine file, or a compress checkpoint.

    A module is used as it is (on its own device, its train/eval mode restored after use). An ONNX
    file runs in ONNX Runtime at graph ``optimization`` (default ``all``, as a deployed session).

    Raises:
        CompressError: the file is missing, of an unknown kind, or cannot be loaded.
    """
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        kind = model_kind(path)
        if kind is ModelKind.onnx:
            return OrtEngine(path, level=optimization)
        if kind is ModelKind.engine:
            from compress.export.tensorrt import TrtEngine

            return TrtEngine(path)
        from compress.models import load_model

        return load_model(path, trust=trust).to(device)
    if callable(obj):
        return obj
    raise CompressError(f"cannot run a {type(obj).__name__} as a model")


def _label(obj: object, default: str) -> str:
    return str(obj) if isinstance(obj, (str, os.PathLike)) else default


SAMPLE_METRICS = ("top1", "agreement")  # per-sample 0/1 scores: a drop is a whole number of samples


def _unit(output: torch.Tensor, dim: int | None) -> str:
    return "pixels" if output.ndim > 3 else ("tokens" if dim == 2 else "positions")


def _moved_positions(outputs: metrics.Outputs, reference: metrics.Outputs, metric: str) -> tuple[int | None, int, str]:
    """:func:`_moved` for per-position outputs: counts are of positions (those that count, see
    :mod:`compress.positions`); a sample changed when any of its positions did."""
    name, a, b = metrics.task_pair(outputs, reference)
    dim, valid = outputs.layout(name)
    pred, ref = metrics.predictions(a, dim), metrics.predictions(b, dim)
    count = valid if valid is not None else torch.ones_like(pred, dtype=torch.bool)
    per_sample = ((pred != ref) & count).reshape(len(pred), -1).sum(1)
    changed, n, moved, unit = int((per_sample > 0).sum()), len(pred), int(per_sample.sum()), _unit(a, dim)
    labels = outputs.labels
    if metric == "top1" and labels is not None and labels.shape == pred.shape:
        labelled = count & (labels >= 0) & (labels < a.shape[dim])  # type: ignore[index]
        lost = int(((ref == labels) & (pred != labels) & labelled).sum())
        gained = int(((ref != labels) & (pred == labels) & labelled).sum())
        return lost - gained, changed, (f"{lost - gained} of {int(labelled.sum())} labelled {unit} ({lost} lost, "
                                        f"{gained} gained; {changed} of {n} samples changed)")
    return (moved if metric == "agreement" else None), changed, \
        f"{changed} of {n} samples ({moved} of {int(count.sum())} {unit}) changed their arg-max"


def _counted(outputs: metrics.Outputs, reference: metrics.Outputs) -> str:
    """What ``drop_samples`` counts: samples, or the positions of a per-position task output."""
    name, a, _ = metrics.task_pair(outputs, reference)
    dim = outputs.layout(name)[0]
    return _unit(a, dim) if dim is not None and a.ndim > 2 else "samples"


def _moved(outputs: metrics.Outputs, reference: metrics.Outputs, metric: str) -> tuple[int | None, int, str]:
    """``(net samples lost, samples whose arg-max changed, a phrase for messages)``; per-position outputs
    count positions (:func:`_moved_positions`)."""
    name, a, b = metrics.task_pair(outputs, reference)
    dim = outputs.layout(name)[0]
    if dim is not None and a.ndim > 2:
        return _moved_positions(outputs, reference, metric)
    pred, ref = metrics.predictions(a, dim), metrics.predictions(b, dim)
    changed = int((pred != ref).sum())
    n = len(pred)
    if metric == "top1" and outputs.labels is not None and reference.labels is not None:
        lost = int(((ref == reference.labels) & (pred != outputs.labels)).sum())
        gained = int(((ref != reference.labels) & (pred == outputs.labels)).sum())
        return lost - gained, changed, f"{lost - gained} of {n} samples ({lost} lost, {gained} gained)"
    if metric == "agreement":
        return changed, changed, f"{changed} of {n} samples changed their arg-max"
    return None, changed, f"{changed} of {n} samples changed their arg-max"


def _per_output(outputs: metrics.Outputs, reference: metrics.Outputs) -> dict[str, dict[str, float]]:
    """Every output's fidelity and ``rel_error`` (over the positions that count), by name."""
    per_output = metrics.fidelity_all(outputs, reference)
    for name, a, b in metrics.pair_outputs(outputs, reference):
        dim, valid = outputs.layout(name)
        per_output[name]["rel_error"] = rel_error(metrics.counted(a, dim, valid), metrics.counted(b, dim, valid))
    return per_output


def _worst_of(per_output: dict[str, dict[str, float]]) -> dict[str, float]:
    """The worst figure over the outputs (a NaN ``rel_error`` is the worst)."""
    return {"agreement": min(f["agreement"] for f in per_output.values()),
            "cosine": min(f["cosine"] for f in per_output.values()),
            "max_abs": max(f["max_abs"] for f in per_output.values()),
            "mean_abs": max(f["mean_abs"] for f in per_output.values()),
            "rel_error": max((f["rel_error"] for f in per_output.values()), key=lambda v: (v != v, v))}


def _task_metrics(outputs: metrics.Outputs, reference: metrics.Outputs, metric: str) -> tuple[float, float]:
    """``(model's, reference's)`` task metric; a label-free one is the model's against the reference (1.0)."""
    if metric in metrics.LABEL_FREE:
        return metrics.task_fidelity(outputs, reference)[metric], 1.0
    return metrics.score(metric, outputs)[metric], metrics.score(metric, reference)[metric]


def _worst_samples(outputs: metrics.Outputs, reference: metrics.Outputs, worst: int) -> list[dict[str, Any]]:
    """The ``worst`` samples by max |error| of the task output (positions that count only)."""
    name, a, b = metrics.task_pair(outputs, reference)
    dim, valid = outputs.layout(name)
    diff = (a - b).abs()
    if valid is not None and dim is not None:
        diff = diff.where(valid.unsqueeze(dim), 0.0)
    err = diff.reshape(len(a), -1).amax(1)
    classify = dim is None or a.ndim == 2  # a per-position output has no one arg-max per sample
    labels = outputs.labels
    return [
        {
            "index": i,
            "max_abs": float(err[i]),
            **({"model_top1": int(a[i].reshape(-1).argmax()), "reference_top1": int(b[i].reshape(-1).argmax())}
               if classify else {}),
            **({"label": int(labels[i])} if labels is not None and labels.ndim == 1 else {}),
        }
        for i in torch.topk(err, min(worst, len(err))).indices.tolist()
    ]


def _failures(outputs: metrics.Outputs, reference: metrics.Outputs, per_output: dict[str, dict[str, float]],
              found: dict[str, Any], limits: dict[str, float | None]) -> list[str]:
    """One line per threshold exceeded (``found``: metric, drop, drop_samples, changed, moved); NaN/Inf outputs
    fail whatever the thresholds, since no metric can vouch for them."""
    pairs = metrics.pair_outputs(outputs, reference)

    def at(name: str | None) -> str:  # which output a failure is about, when there are several
        return f"output '{name or ''}': " if len(pairs) > 1 else ""

    failures = [f"{at(name)}{who} outputs hold {bad} NaN/Inf value(s)" for name, a, b in pairs
                for who, o in (("model", a), ("reference", b)) if (bad := int((~torch.isfinite(o)).sum()))]
    metric, task = found["metric"], outputs.task
    if limits["max_drop"] is not None and found["drop"] > limits["max_drop"]:
        failures.append(f"{at(task)}{metric} drop {found['drop']:.3f} pt ({found['moved']}) > max_drop {limits['max_drop']} pt")
    if limits["max_drop_samples"] is not None and found["drop_samples"] is not None \
            and found["drop_samples"] > limits["max_drop_samples"]:
        failures.append(f"{at(task)}{metric} drop {found['moved']} > max_drop_samples {limits['max_drop_samples']}")
    for name, f in per_output.items():  # every output is held to the fidelity thresholds; the worst decides
        if limits["min_agreement"] is not None and f["agreement"] < limits["min_agreement"]:
            failures.append(f"{at(name)}agreement {f['agreement']:.4f} < min_agreement {limits['min_agreement']}")
        if limits["min_cosine"] is not None and f["cosine"] < limits["min_cosine"]:
            failures.append(f"{at(name)}cosine {f['cosine']:.6f} < min_cosine {limits['min_cosine']}")
        bound = limits["max_rel_error"]
        if bound is not None and not f["rel_error"] <= bound:  # NaN outputs fail here too
            failures.append(f"{at(name)}max |error| {f['rel_error']:.3g} of the reference RMS ({found['changed']} of "
                            f"{len(outputs.logits)} samples changed their arg-max) > max_rel_error {bound:.3g}")
    return failures


def compare(
    outputs: metrics.Outputs,
    reference: metrics.Outputs,
    *,
    metric: str = "top1",
    max_drop: float | None = None,
    max_drop_samples: int | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    max_rel_error: float | None = None,
    worst: int = 5,
) -> CheckResult:
    """Compare outputs with reference outputs of the same inputs and apply the thresholds.

    Per-position outputs (``[N, C, H, W]``, ``[N, T, C]``, see :mod:`compress.positions`) are compared per
    position, leaving out padding and positions whose attention mask is 0.

    Args:
        max_drop: the largest metric drop in points.
        max_drop_samples: the largest drop in samples (net: lost minus gained; positions for per-position
            outputs); top1 and agreement only.
        max_rel_error: the largest ``max |model - reference| / rms(reference)`` (see :mod:`compress.export.drift`).

    Raises:
        CompressError: ``max_drop_samples`` with a metric that is not a per-sample count.
    """
    if max_drop_samples is not None and metric not in SAMPLE_METRICS:
        raise CompressError(f"max_drop_samples: counts samples, so it needs metric {' or '.join(SAMPLE_METRICS)}, "
                            f"not {metric}; use max_drop (points)")
    per_output = _per_output(outputs, reference)
    fid = _worst_of(per_output)
    model_metric, reference_metric = _task_metrics(outputs, reference, metric)
    drop = (reference_metric - model_metric) * 100.0
    drop_samples, changed, moved = _moved(outputs, reference, metric)
    thresholds = {"max_drop": max_drop, "max_drop_samples": max_drop_samples, "min_agreement": min_agreement,
                  "min_cosine": min_cosine, "max_rel_error": max_rel_error}
    found = {"metric": metric, "drop": drop, "drop_samples": drop_samples, "changed": changed, "moved": moved}
    failures = _failures(outputs, reference, per_output, found, thresholds)
    return CheckResult(
        passed=not failures,
        metric=metric,
        model_metric=model_metric,
        reference_metric=reference_metric,
        drop=drop,
        drop_samples=drop_samples,
        changed=changed,
        agreement=fid["agreement"],
        cosine=fid["cosine"],
        max_abs=fid["max_abs"],
        mean_abs=fid["mean_abs"],
        rel_error=fid["rel_error"],
        samples=len(outputs.logits),
        thresholds=thresholds,
        failures=failures,
        worst=_worst_samples(outputs, reference, worst),
        output=outputs.task,
        outputs=per_output,
        drop_unit=_counted(outputs, reference),
    )


def check(
    model: nn.Module | str | os.PathLike[str] | Runner,
    reference: nn.Module | str | os.PathLike[str] | Runner,
    data: DataLoader,
    *,
    metric: str = "top1",
    max_drop: float | None = 0.5,
    max_drop_samples: int | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    max_rel_error: float | None = None,
    fp32_tolerance: bool = True,
    device: torch.device | str = "cpu",
    optimization: Optimization = Optimization.all,
    trust: Sequence[str] = (),
    output: str | None = None,
) -> CheckResult:
    """Run ``model`` and ``reference`` over ``data`` and compare them (see :func:`compare`): every
    output, with the task ``metric`` on ``output`` (default: see :mod:`compress.outputs`).

    Args:
        model/reference: an ``nn.Module``, an ``.onnx`` file (run in ONNX Runtime), a compress
            checkpoint ``.pt`` (loaded onto ``device``), or any tensor -> tensor callable.
            A module is not moved and keeps its train/eval mode.
        data: batches of ``(inputs, labels)`` or inputs alone (then use a label-free ``metric``).
        optimization: ONNX Runtime's graph optimisation level for ``.onnx`` files (default ``all``).
        fp32_tolerance: when ``max_rel_error`` is None and both run in float32 (:func:`is_fp32`),
            bound their output error by float rounding (``FLOAT_TOLERANCE``, see :mod:`compress.export.drift`).
    """
    try:
        metrics.check_metric_name(metric)
    except ValueError as exc:
        raise CompressError(f"--metric: {exc}") from None
    runners = [as_runner(model, device, optimization, trust), as_runner(reference, device, optimization, trust)]
    out, ref = metrics.collect_many(runners, data, names=[_label(model, "model"), _label(reference, "reference")],
                                    output=output)
    if max_rel_error is None and fp32_tolerance and all(map(is_fp32, runners)):
        max_rel_error = FLOAT_TOLERANCE
    return compare(out, ref, metric=metric, max_drop=max_drop, max_drop_samples=max_drop_samples,
                   min_agreement=min_agreement, min_cosine=min_cosine, max_rel_error=max_rel_error)
