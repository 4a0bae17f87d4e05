"""``calibrate``: set every quantizer's amax from data (activations) and the weights themselves."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.data import split_batch
from compress.errors import CompressError, DataError, first_line, parse_enum
from compress.inputs import batch_size, call_model, move_inputs, take
from compress.ptq import auto
from compress.ptq.calibrators import HistogramCalibrator, MaxCalibrator, Method, make
from compress.ptq.table import LayerCalibration, layer_entry
from compress.quant import quantizers, refresh_weight_amax
from compress.quant.quantizer import TensorQuantizer


@dataclass
class Calibration:
    """What :func:`calibrate` did (goes into the stage's report entry)."""

    method: str
    samples: int
    batches: int
    quantizers: int
    seconds: float
    layers: list[LayerCalibration] = field(default_factory=list)  # one row per activation quantizer

    @property
    def warnings(self) -> list[str]:
        """Layers that clip a large share of their values (see :mod:`compress.ptq.table`)."""
        return [w for w in (row.warning for row in self.layers) if w]

    def to_dict(self) -> dict[str, object]:
        head = {k: v for k, v in self.__dict__.items() if k != "layers"}
        return {**head, "layers": [row.to_dict() for row in self.layers], "warnings": self.warnings}


def to_method(value: Method | str) -> Method:
    """Convert a calibrator name once, at the edge.

    Raises:
        CompressError: unknown calibrator (the choices and the closest one named).
    """
    return parse_enum(Method, value, what="calibrator")


def _activation_quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, q) for n, q in quantizers(model) if q.spec.axis is None and q.quant_enabled]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: Iterable,
    method: Method | str = Method.max,
    *,
    percentile: float = 99.99,
    limit: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    where: str = "calibrate",
) -> Calibration:
    """Calibrate a model prepared by :func:`compress.quant.prepare`.

    Weights get per-output-channel max; activations run float (quantization off) over ``data`` and
    get their amax from ``method``.

    Args:
        data: batches of ``(inputs, labels)`` or inputs.
        method: ``max``, ``percentile``, ``entropy`` (KL, 2048 bins, 128 levels; 256 for a
            non-negative tensor on a uint8 target), ``mse``, or ``auto``: per quantizer, the one of those four
            with the least error at the output of the layer it feeds (:mod:`compress.ptq.auto`; the report's
            per-layer ``method`` says which).
        limit: stop after this many samples (default: all of ``data``).
        device: where to run (default: where the model is); histograms are kept there too.

    Returns:
        What was done, with the per-layer table (amax, observed max |x|, clipped share) and its warnings.

    Raises:
        CompressError: no quantizers; no data; NaN/Inf activations; a tensor that is all zeros.
    """
    method = to_method(method)
    if not 0 < percentile <= 100:
        raise CompressError(f"{where}: percentile must be in (0, 100], not {percentile}")
    acts = _activation_quantizers(model)
    if not any(True for _ in quantizers(model)):
        raise CompressError(f"{where}: the model has no quantizers; call compress.quant.prepare(model) first")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    try:
        refresh_weight_amax(model)
    except CompressError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    calibrators: dict[str, MaxCalibrator | HistogramCalibrator] = {}
    was_training = model.training
    model.eval()
    samples = batches = 0
    table: list[LayerCalibration] = []
    weights = [q for _, q in quantizers(model) if q.spec.axis is not None and q.quant_enabled]
    try:
        for q in weights:  # activations are calibrated on the float model, as TensorRT and ModelOpt do
            q.quant_enabled = False
        for name, q in acts:
            q.calibrator = calibrators[name] = make(method)
            q.calib_enabled = True
        # disable=None: off when stderr is not a terminal (CI logs); the label stays short, the location
        # (`where`) belongs in error messages
        bar = tqdm(data, desc="calibrate", disable=None if progress else True, leave=False)
        kept: list[object] = []  # auto: the first AUTO_SAMPLES samples, to compare candidates on
        for batch in bar:
            inputs, _ = split_batch(batch)
            if limit is not None and samples >= limit:
                break
            if limit is not None and samples + batch_size(inputs) > limit:
                inputs = take(inputs, slice(0, limit - samples))
            inputs = move_inputs(inputs, device)
            if method is Method.auto and samples < auto.AUTO_SAMPLES:
                kept.append(take(inputs, slice(0, auto.AUTO_SAMPLES - samples)))
            try:
                call_model(model, inputs)
            except CompressError as exc:
                raise type(exc)(f"{where}: {exc}") from None
            except Exception as exc:  # the user's model may raise anything on a bad batch
                raise CompressError(f"{where}: the model fails on calibration batch {batches}: {first_line(exc)}") from None
            samples += batch_size(inputs)
            batches += 1
        if samples == 0:
            raise DataError(f"{where}: the calibration data is empty")
        for name, _q in acts:
            if not calibrators[name].seen:
                raise CompressError(f"{where}: {name} saw no data (its layer never ran); exclude it")
        chosen = _auto(model, acts, calibrators, weights, kept, percentile) if method is Method.auto else {}
        for name, q in acts:
            cal = calibrators[name]
            if name in chosen:
                amax = chosen[name].amax[chosen[name].best]
            elif isinstance(cal, MaxCalibrator):
                amax = cal.compute_amax()
            else:
                nonneg = q.spec.unsigned and cal.nonneg
                amax = cal.compute_amax(method, percentile=percentile, levels=256 if nonneg else 128)
            try:
                q.set_amax(amax, nonneg=cal.nonneg)
            except CompressError as exc:
                raise type(exc)(f"{where}: {exc}") from None
            row = layer_entry(name, method.value, cal, amax)
            if name in chosen:
                row = chosen[name].row(row)
            table.append(row)
    finally:
        for _, q in acts:
            q.calibrator, q.calib_enabled = None, False
        for q in weights:
            q.quant_enabled = True
        model.train(was_training)
    return Calibration(method.value, samples, batches, len(acts), round(time.perf_counter() - start, 3), table)


def _auto(model: nn.Module, acts: list[tuple[str, TensorQuantizer]], calibrators: dict[str, object],
          weights: list[TensorQuantizer], kept: list[object], percentile: float) -> dict[str, auto.Choice]:
    """Per activation quantizer, the candidate ranges and their errors downstream (see :mod:`compress.ptq.auto`):
    the model runs float on ``kept`` with its weights quantized."""
    where = auto.consumers(model, [name for name, _ in acts])
    choices, nonneg = {}, {}
    for name, q in acts:
        cal = calibrators[name]
        assert isinstance(cal, HistogramCalibrator)
        nonneg[name] = cal.nonneg
        choices[name] = auto.Choice(auto.candidates(cal, nonneg=q.spec.unsigned and cal.nonneg, percentile=percentile),
                                    where[name])
    states = [(q, q.quant_enabled, q.calib_enabled) for _, q in acts]
    for q, _, _ in states:
        q.quant_enabled = q.calib_enabled = False
    for q in weights:
        q.quant_enabled = True
    try:
        auto.measure(model, dict(acts), choices, nonneg, kept)
    finally:
        for q, enabled, calib in states:
            q.quant_enabled, q.calib_enabled = enabled, calib
        for q in weights:
            q.quant_enabled = False
    return choices
