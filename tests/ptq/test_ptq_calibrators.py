"""Calibrators and amax searches: against direct computations and a loop reference of TensorRT's KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_errors import one_line_error
from helpers_quant import NanAfterConv, digits

from compress import ptq, quant
from compress.errors import CompressError, DataError
from compress.ptq import HistogramCalibrator, MaxCalibrator, Method, search


def _entropy_loop(hist: np.ndarray, width: float, levels: int = 128, zero_spike: bool = False, start: int = 128) -> float:
    """pytorch-quantization / TensorRT entropy calibration, one candidate at a time: bin ``j`` of
    candidate ``i`` in group ``floor(j * levels / i)`` (its ``linspace`` grouping, in exact integers),
    candidates up to the last non-empty bin, ties to the larger amax."""
    bins = hist.astype(np.float64)[: int(np.nonzero(hist)[0][-1]) + 1]
    if zero_spike:
        bins[0] = bins[1]
    divergences = []
    for i in range(min(start, len(bins)), len(bins) + 1):
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()
        nonzero = bins[:i] != 0
        group = np.arange(i) * levels // i
        q = np.zeros(i)
        for j in range(levels):
            members = (group == j) & nonzero
            if members.any():
                q[members] = bins[:i][group == j].sum() / members.sum()
        pn, qn = p / p.sum(), q / q.sum()
        mask = pn > 0
        divergences.append(np.inf if np.any(qn[mask] == 0) else float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask]))))
    d = np.array(divergences)
    return (len(d) - 1 - int(np.argmin(d[::-1])) + min(start, len(bins))) * width


@pytest.mark.parametrize("case", range(5))
def test_vectorised_entropy_search_equals_the_loop_reference(case: int) -> None:
    rng = np.random.default_rng(case)
    x = [np.abs(rng.standard_t(3, 50000)), np.abs(rng.normal(size=50000)), rng.exponential(size=50000),
         np.maximum(rng.normal(size=50000), 0), np.maximum(rng.normal(size=50000), 0)][case]
    spike = case == 4  # a ReLU output: half the values are exact zeros
    hist, _ = np.histogram(x, bins=384, range=(0, x.max()))
    width = x.max() / 384
    h = torch.tensor(hist, dtype=torch.float64)
    ours = float(search.entropy_amax(h, width, zero_spike=spike, max_clip_error=np.inf))  # TensorRT's search, unbounded
    assert ours == pytest.approx(_entropy_loop(hist, width, zero_spike=spike), rel=1e-5)
    unsigned = float(search.entropy_amax(h, width, 256, zero_spike=spike, max_clip_error=np.inf))
    assert unsigned == pytest.approx(_entropy_loop(hist, width, 256, zero_spike=spike), rel=1e-5)


def test_entropy_is_not_fooled_by_the_relu_zero_spike() -> None:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(100000))
    cal = HistogramCalibrator()
    cal.collect(x)
    assert cal.nonneg
    assert float(cal.compute_amax(Method.entropy)) > 0.6 * float(x.max())  # without the fix: ~0.25 x max


def test_histogram_range_doubling_keeps_counts_exact() -> None:
    torch.manual_seed(0)
    cal = HistogramCalibrator(bins=256)
    batches = [torch.rand(1000) * s for s in (1.0, 3.0, 2.0, 9.0)]
    for b in batches:
        cal.collect(b)
    first = float(batches[0].max())
    assert cal.range == pytest.approx(first * 16)  # x4 for the 3.0 batch, x4 again for the 9.0 one
    everything = torch.cat(batches)
    assert cal.hist.sum() == everything.numel()
    direct = torch.histc(everything, bins=256, min=0, max=cal.range).double()
    assert (cal.hist - direct).abs().sum() <= 4  # only values exactly on bin edges may differ
    assert cal.nonneg


def test_percentile_max_and_mse_on_known_distributions() -> None:
    torch.manual_seed(0)
    x = torch.randn(200000)
    hist_cal, max_cal = HistogramCalibrator(), MaxCalibrator()
    hist_cal.collect(x)
    max_cal.collect(x)
    assert float(max_cal.compute_amax()) == pytest.approx(float(x.abs().max()))
    assert float(hist_cal.compute_amax(Method.max)) == pytest.approx(float(x.abs().max()), rel=1e-3)
    p999 = float(hist_cal.compute_amax(Method.percentile, percentile=99.9))
    assert p999 == pytest.approx(float(torch.quantile(x.abs()[:100000], 0.999)), rel=0.03)
    mse = float(hist_cal.compute_amax(Method.mse))
    assert 2.5 < mse < float(x.abs().max())  # clips the Gaussian tail, keeps the bulk
    for method in Method:
        if method not in (Method.max, Method.auto):  # auto picks among the others per quantizer
            assert float(hist_cal.compute_amax(method)) > 0


def test_mse_choice_really_minimises_quantization_error() -> None:
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((100000,))
    cal = HistogramCalibrator()
    cal.collect(x)
    chosen = float(cal.compute_amax(Method.mse))

    def mse(amax: float) -> float:
        scale = amax / 127
        return float(((torch.clamp(torch.round(x / scale), -127, 127) * scale - x) ** 2).mean())

    for other in (chosen * 0.7, chosen * 1.4, float(x.abs().max())):
        assert mse(chosen) < mse(other)


def test_calibrate_reports_samples_and_respects_limit(digits_cnn_checkpoint) -> None:
    import compress

    qmodel = quant.prepare(compress.load(digits_cnn_checkpoint), "tensorrt")
    result = ptq.calibrate(qmodel, digits("train", batch_size=100), "entropy", limit=250)
    assert (result.samples, result.batches, result.method) == (250, 3, "entropy")
    assert not quant.uncalibrated(qmodel)
    assert not any(q.calib_enabled for _, q in quant.quantizers(qmodel))


def test_calibration_errors_are_one_line_and_named(digits_cnn_checkpoint) -> None:
    import compress

    qmodel = quant.prepare(compress.load(digits_cnn_checkpoint), "tensorrt")
    assert "calibration data is empty" in one_line_error(DataError, ptq.calibrate, qmodel, [], "max")
    assert "unknown calibrator 'entorpy' (choose from max, percentile, entropy, mse, auto); did you mean 'entropy'?" in one_line_error(CompressError, ptq.calibrate, qmodel, [], "entorpy")
    assert "no quantizers" in one_line_error(CompressError, ptq.calibrate, compress.load(digits_cnn_checkpoint), [])
    nan_model = quant.prepare(NanAfterConv(), "tensorrt", graph_quantizers=False)
    msg = one_line_error(DataError, ptq.calibrate, nan_model, digits("train"), "percentile", limit=64)
    assert "fc.input_quantizer" in msg and "NaN" in msg
    assert not any(q.calib_enabled for _, q in quant.quantizers(nan_model))  # modes restored after the error


def test_entropy_keeps_a_relu6_range_with_zero_and_saturation_spikes() -> None:
    # The issue-15 failure: a ReLU6 output (40 % exact zeros, 3 % saturated at 6) over a histogram
    # whose range overshoots (the first batch's max is 2.5, so the range doubles twice, to 10).
    torch.manual_seed(0)
    x = torch.clamp(torch.randn(200000) * 3.0 + 0.4, 0, 6)
    assert 0.02 < float((x == 6).float().mean()) < 0.05 and float((x == 0).float().mean()) > 0.3
    cal = HistogramCalibrator()
    cal.collect(x.clamp(max=2.5)[:1000])
    cal.collect(x)
    assert cal.range == pytest.approx(10.0, rel=1e-3)
    width = cal.range / cal.bins
    for levels in (128, 256):
        amax = float(cal.compute_amax(Method.entropy, levels=levels))
        # within one histogram bin of 6 (the spike's bin edge), far below one uint8 step (6 / 255)
        assert abs(amax - 6.0) <= width + 1e-6


def test_entropy_clipping_error_stays_below_its_rounding_error() -> None:
    # On a ReLU'd Student-t(3.5) TensorRT's KL alone clips a long tail whose squared clipping error is
    # over 10 times the rounding error; the default bound (max_clip_error 1) moves amax up until the
    # clipping error, counted on the values themselves, is at most the rounding error (plus the one
    # bin that amax, a bin edge, may cut: one bin's count times its width squared, a few percent here).
    torch.manual_seed(0)
    x = torch.relu(torch.distributions.StudentT(3.5).sample((200000,)))
    cal = HistogramCalibrator()
    cal.collect(x)
    h, width = cal.hist, cal.range / cal.bins

    def errors(amax: float) -> tuple[float, float]:
        clip = float(((x - amax).clamp(min=0) ** 2).sum())
        return clip, (amax / 255) ** 2 / 12 * float(((x > 0) & (x <= amax)).sum())
    unbounded = float(search.entropy_amax(h, width, 256, zero_spike=True, max_clip_error=np.inf))
    bounded = float(cal.compute_amax(Method.entropy, levels=256))
    clip, rounding = errors(unbounded)
    assert clip > 10 * rounding  # 548 vs 44: the bound really binds here
    clip, rounding = errors(bounded)
    assert unbounded < bounded < float(x.max()) and clip <= 1.1 * rounding
    share = float(search.entropy_amax(h, width, 256, zero_spike=True, max_clip_error=np.inf, max_clip=1e-5))
    assert float((x > share).float().mean()) <= 1e-5 + float(((x > share - width) & (x <= share)).float().mean())


def _calibration_values(qmodel: torch.nn.Module, loader, limit: int) -> dict[str, torch.Tensor]:
    """Every activation quantizer's calibration inputs, captured by hooks (|x|, flattened)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [q.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, []).append(args[0].abs().flatten()))
             for name, q in quant.quantizers(qmodel) if q.spec.axis is None]
    ptq.calibrate(qmodel, loader, "max", limit=limit)
    for hook in hooks:
        hook.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_table_matches_the_data(digits_cnn_checkpoint, method: str) -> None:
    import compress

    qmodel = quant.prepare(compress.load(digits_cnn_checkpoint), "onnxruntime")
    values = _calibration_values(qmodel, digits("train", batch_size=100), 300)
    result = ptq.calibrate(qmodel, digits("train", batch_size=100), method, percentile=99.0, limit=300)
    assert [r.name for r in result.layers] == list(values)
    for row in result.layers:
        x = values[row.name]
        assert row.method == method and row.max == pytest.approx(float(x.max()))
        assert row.amax == pytest.approx(float(dict(quant.quantizers(qmodel))[row.name].amax))
        # the table counts bins wholly above amax: it may miss one bin (width <= 2 max / 2048) of values
        width = 2 * row.max / 2048
        band = float(((x > row.amax - width) & (x <= row.amax + width)).float().mean())
        assert abs(row.clipped - float((x > row.amax).float().mean())) <= band + 1e-12
    doc = result.to_dict()
    assert len(doc["layers"]) == result.quantizers and doc["warnings"] == result.warnings
    if method == "percentile":  # 99th percentile of |x|: about 1 % clipped, some layers above the 1 % line
        assert any(r.clipped > 0.005 for r in result.layers)
        assert all((r.warning is not None) == (r.clipped > 0.01 or (r.amax < 0.5 * r.max and r.clipped > 0.001))
                   for r in result.layers)


def test_report_md_lists_the_most_clipped_layers_and_the_warnings(digits_cnn_checkpoint) -> None:
    import compress
    from compress.report import _calibration

    qmodel = quant.prepare(compress.load(digits_cnn_checkpoint), "onnxruntime")
    cal = ptq.calibrate(qmodel, digits("train", batch_size=100), "percentile", percentile=99.0, limit=300).to_dict()
    lines = _calibration([{"type": "prune"}, {"type": "ptq", "calibration": cal}])
    assert lines[:3] == ["", "## Calibration", ""] and lines[3].startswith("- 2. ptq: percentile on 300 samples")
    worst = max(cal["layers"], key=lambda r: r["clipped"])
    assert f"`{worst['name']}` {worst['clipped']:.3%}" in lines[3]  # the most clipped layer comes first
    assert cal["warnings"] and lines[4:] == [f"  - WARNING {w}" for w in cal["warnings"]]
    assert _calibration([{"type": "ptq"}]) == []
