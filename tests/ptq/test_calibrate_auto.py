"""``calibrator: auto``: each activation quantizer gets the candidate range (max, percentile, entropy, mse) with the
least error at the output of the layer it feeds, not the least error on its own histogram."""

from __future__ import annotations

import json

import torch
from torch import nn

from compress import ptq, quant


class Tokens(nn.Module):
    """A Linear over 256 features applied to 64 tokens, averaged: the features are N(0, 1) but for one rare
    outlier of 30 on feature 0, which the Linear amplifies 100-fold over the others."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 8)
        with torch.no_grad():
            self.fc.weight.normal_(0, 0.01)
            self.fc.weight[:, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).mean(1)


def _data() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(64, 64, 256)
    x[:, :, 0] = 0
    x[0, 0, 0] = 30.0  # 1 value in 1,048,576
    return x


def _calibrated(method: str) -> tuple[nn.Module, ptq.Calibration]:
    qmodel = quant.prepare(Tokens(), "tensorrt")
    return qmodel, ptq.calibrate(qmodel, [_data()], method)


def test_auto_keeps_an_outlier_the_next_layer_amplifies_which_the_histogram_mse_clips() -> None:
    # On the histogram alone, clipping the single outlier costs 26^2 = 676 while rounding 1M values on a 30-wide
    # range costs ~4,600: mse and percentile 99.99 clip it (entropy happens to keep it). At the Linear's output the
    # outlier weighs 100x: a range that keeps it wins.
    x = _data()
    clipped = {m: float(_calibrated(m)[1].layers[0].amax) for m in ("percentile", "mse")}
    assert all(amax < 10 for amax in clipped.values()), clipped
    qmodel, cal = _calibrated("auto")
    row = cal.layers[0]
    assert (cal.method, row.method, row.measured_at) == ("auto", "max", ["fc"])
    assert row.amax == 30.0 and row.errors["max"] == 1.0
    assert all(row.errors[m] > 10 for m in clipped)  # each clipping candidate is > 10x worse at the output
    json.dumps(cal.to_dict(), allow_nan=False)  # the report's table is plain JSON
    with torch.no_grad():
        want = Tokens()(x)  # same init: the float model
        auto_error = (qmodel(x) - want).pow(2).sum()
        mse_model, _ = _calibrated("mse")
        assert auto_error < 0.1 * (mse_model(x) - want).pow(2).sum()


def test_a_quantizer_feeding_no_layer_is_compared_on_its_own_tensor() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x))) + x

    torch.manual_seed(0)
    qmodel = quant.prepare(Residual().eval(), "tensorrt")
    cal = ptq.calibrate(qmodel, [torch.randn(8, 4, 8, 8)], "auto")
    rows = {r.name: r for r in cal.layers}
    assert rows["conv.input_quantizer"].measured_at == ["conv"]
    residual = [r for name, r in rows.items() if name.startswith("act_quant.")]
    assert residual and all(r.measured_at == [] and r.errors[r.method] == 1.0 for r in residual)
    assert all(min(v for v in r.errors.values() if v is not None) == 1.0 for r in cal.layers)


def test_onnxruntime_graph_quantizers_are_compared_at_the_layers_they_feed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    qmodel = quant.prepare(model, "onnxruntime")  # one quantizer per tensor, at its producer
    cal = ptq.calibrate(qmodel, [torch.randn(8, 3, 12, 12)], "auto")
    at = sorted(tuple(r.measured_at) for r in cal.layers)
    assert at == [("0",), ("2",)]
