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

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CheckResult:
    """Outcome of a check; ``passed`` is False when any threshold is exceeded (see ``failures``)."""

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
    pred = outputs.logits.reshape(len(outputs.logits), -1).argmax(1)
    ref = reference.logits.reshape(len(reference.logits), -1).argmax(1)
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
    fid = metrics.fidelity(outputs.logits, reference.logits)
    if metric in metrics.LABEL_FREE:
        model_metric, reference_metric = fid[metric], 1.0
    else:
        model_metric = metrics.score(metric, outputs)[metric]
        reference_metric = metrics.score(metric, reference)[metric]
    drop = (reference_metric - model_metric) * 100.0
    drop_samples, changed, moved = _moved(outputs, reference, metric)
    failures = [f"{who} outputs hold {bad} NaN/Inf value(s)" for who, o in (("model", outputs), ("reference", reference))
                if (bad := int((~torch.isfinite(o.logits)).sum()))]  # no metric can vouch for such outputs
    if max_drop is not None and drop > max_drop:
        failures.append(f"{metric} drop {drop:.3f} pt ({moved}) > max_drop {max_drop} pt")
    if max_drop_samples is not None and drop_samples is not None and drop_samples > max_drop_samples:
        failures.append(f"{metric} drop {moved} > max_drop_samples {max_drop_samples}")
    if min_agreement is not None and fid["agreement"] < min_agreement:
        failures.append(f"agreement {fid['agreement']:.4f} < min_agreement {min_agreement}")
    if min_cosine is not None and fid["cosine"] < min_cosine:
        failures.append(f"cosine {fid['cosine']:.6f} < min_cosine {min_cosine}")
    rel = rel_error(outputs.logits, reference.logits)
    if max_rel_error is not None and not rel <= max_rel_error:  # NaN outputs fail here too
        failures.append(f"max |error| {rel:.3g} of the reference RMS ({changed} of {len(outputs.logits)} samples "
                        f"changed their arg-max) > max_rel_error {max_rel_error:.3g}")
    err = (outputs.logits - reference.logits).abs().reshape(len(outputs.logits), -1).amax(1)
    top = torch.topk(err, min(worst, len(err))).indices.tolist()
    worst_rows = [
        {
            "index": i,
            "max_abs": float(err[i]),
            "model_top1": int(outputs.logits[i].reshape(-1).argmax()),
            "reference_top1": int(reference.logits[i].reshape(-1).argmax()),
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
) -> CheckResult:
    """Run ``model`` and ``reference`` over ``data`` and compare them (see :func:`compare`).

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
    out, ref = metrics.collect_many(runners, data, names=[_label(model, "model"), _label(reference, "reference")])
    if max_rel_error is None and fp32_tolerance and all(map(is_fp32, runners)):
        max_rel_error = FLOAT_TOLERANCE
    return compare(out, ref, metric=metric, max_drop=max_drop, max_drop_samples=max_drop_samples,
                   min_agreement=min_agreement, min_cosine=min_cosine, max_rel_error=max_rel_error)
