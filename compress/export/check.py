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


def _moved(outputs: metrics.Outputs, reference: metrics.Outputs, metric: str) -> tuple[int | None, int, str]:
    """``(net samples lost, samples whose arg-max changed, a phrase for messages)``."""
    pred, ref = metrics.predictions(outputs.logits), metrics.predictions(reference.logits)
    if pred.ndim > 1:  # per-pixel arg-max: a sample changed when any of its pixels did
        per_sample = (pred != ref).reshape(len(pred), -1).sum(1)
        changed, n = int((per_sample > 0).sum()), len(pred)
        pixels = int(per_sample.sum())
        return (pixels if metric == "agreement" else None), changed, \
            f"{changed} of {n} samples ({pixels} of {pred.numel()} pixels) changed their arg-max"
    changed = int((pred != ref).sum())
    n = len(pred)
    if metric == "top1" and outputs.labels is not None and reference.labels is not None:
        lost = int(((ref == reference.labels) & (pred != outputs.labels)).sum())
        gained = int(((ref != reference.labels) & (pred == outputs.labels)).sum())
        return lost - gained, changed, f"{lost - gained} of {n} samples ({lost} lost, {gained} gained)"
    if metric == "agreement":
        return changed, changed, f"{changed} of {n} samples changed their arg-max"
    return None, changed, f"{changed} of {n} samples changed their arg-max"


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

    Args:
        max_drop: the largest metric drop in points.
        max_drop_samples: the largest drop in samples (net: lost minus gained); top1 and agreement only.
        max_rel_error: the largest ``max |model - reference| / rms(reference)`` (see :mod:`compress.export.drift`).

    Raises:
        CompressError: ``max_drop_samples`` with a metric that is not a per-sample count.
    """
    if max_drop_samples is not None and metric not in SAMPLE_METRICS:
        raise CompressError(f"max_drop_samples: counts samples, so it needs metric {' or '.join(SAMPLE_METRICS)}, "
                            f"not {metric}; use max_drop (points)")
    per_output = metrics.fidelity_all(outputs, reference)
    pairs = metrics.pair_outputs(outputs, reference)
    task = outputs.task if outputs.task in per_output else (pairs[0][0] if len(pairs) == 1 else outputs.task)
    for name, a, b in pairs:
        per_output[name]["rel_error"] = rel_error(a, b)
    fid = {"agreement": min(f["agreement"] for f in per_output.values()),
           "cosine": min(f["cosine"] for f in per_output.values()),
           "max_abs": max(f["max_abs"] for f in per_output.values()),
           "mean_abs": max(f["mean_abs"] for f in per_output.values())}
    rel = max((f["rel_error"] for f in per_output.values()), key=lambda v: (v != v, v))  # NaN is the worst
    if metric in metrics.LABEL_FREE:
        model_metric, reference_metric = per_output[_task_name(outputs, per_output)][metric], 1.0
    else:
        model_metric = metrics.score(metric, outputs)[metric]
        reference_metric = metrics.score(metric, reference)[metric]
    drop = (reference_metric - model_metric) * 100.0
    drop_samples, changed, moved = _moved(outputs, reference, metric)
    several = len(pairs) > 1

    def at(name: str) -> str:  # which output a failure is about, when there are several
        return f"output '{name}': " if several else ""

    failures = [f"{at(name)}{who} outputs hold {bad} NaN/Inf value(s)" for name, a, b in pairs
                for who, o in (("model", a), ("reference", b))
                if (bad := int((~torch.isfinite(o)).sum()))]  # no metric can vouch for such outputs
    if max_drop is not None and drop > max_drop:
        failures.append(f"{at(task or '')}{metric} drop {drop:.3f} pt ({moved}) > max_drop {max_drop} pt")
    if max_drop_samples is not None and drop_samples is not None and drop_samples > max_drop_samples:
        failures.append(f"{at(task or '')}{metric} drop {moved} > max_drop_samples {max_drop_samples}")
    for name, f in per_output.items():  # every output is held to the fidelity thresholds; the worst decides
        if min_agreement is not None and f["agreement"] < min_agreement:
            failures.append(f"{at(name)}agreement {f['agreement']:.4f} < min_agreement {min_agreement}")
        if min_cosine is not None and f["cosine"] < min_cosine:
            failures.append(f"{at(name)}cosine {f['cosine']:.6f} < min_cosine {min_cosine}")
        if max_rel_error is not None and not f["rel_error"] <= max_rel_error:  # NaN outputs fail here too
            failures.append(f"{at(name)}max |error| {f['rel_error']:.3g} of the reference RMS ({changed} of "
                            f"{len(outputs.logits)} samples changed their arg-max) > max_rel_error {max_rel_error:.3g}")
    err = (outputs.logits - reference.logits).abs().reshape(len(outputs.logits), -1).amax(1)
    top = torch.topk(err, min(worst, len(err))).indices.tolist()
    classify = outputs.logits.ndim != 4  # a per-pixel map has no one arg-max per sample
    worst_rows = [
        {
            "index": i,
            "max_abs": float(err[i]),
            **({"model_top1": int(outputs.logits[i].reshape(-1).argmax()),
                "reference_top1": int(reference.logits[i].reshape(-1).argmax())} if classify else {}),
            **({"label": int(outputs.labels[i])} if outputs.labels is not None and outputs.labels.ndim == 1 else {}),
        }
        for i in top
    ]
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
        rel_error=rel,
        samples=len(outputs.logits),
        thresholds={"max_drop": max_drop, "max_drop_samples": max_drop_samples, "min_agreement": min_agreement,
                    "min_cosine": min_cosine, "max_rel_error": max_rel_error},
        failures=failures,
        worst=worst_rows,
        output=task,
        outputs=per_output,
    )


def _task_name(outputs: metrics.Outputs, per_output: dict[str, Any]) -> str:
    if len(per_output) == 1:
        return next(iter(per_output))
    outputs.logits  # noqa: B018 - raises the "name the task output" error when there is none
    return str(outputs.task)


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
