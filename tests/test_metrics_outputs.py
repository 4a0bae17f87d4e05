"""Several outputs and segmentation metrics: naming, per-pixel agreement, mIoU and pixel accuracy by hand."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch

from compress import metrics
from compress.errors import CompressError
from compress.export.check import compare
from compress.outputs import named, select, task_output


def one_hot_map(classes: list[list[int]], n: int = 4) -> torch.Tensor:
    """``[1, n, H, W]`` scores whose per-pixel arg-max is ``classes``."""
    return torch.nn.functional.one_hot(torch.tensor(classes), n).permute(2, 0, 1)[None].float()


PRED = one_hot_map([[0, 1], [1, 2]])
LABELS = torch.tensor([[[0, 1], [2, 2]]])


def test_miou_and_pixel_accuracy_by_hand() -> None:
    # class 0: I 1 U 1; class 1: I 1 U 2 (pred at (0,1),(1,0)); class 2: I 1 U 2; class 3 absent: left out
    assert metrics.miou(PRED, LABELS) == pytest.approx((1 + 0.5 + 0.5) / 3, abs=1e-12)
    assert metrics.pixel_accuracy(PRED, LABELS) == 0.75  # 3 of 4 pixels
    # an ignore label (255) is left out of both
    ignored = torch.tensor([[[0, 1], [255, 2]]])
    assert metrics.pixel_accuracy(PRED, ignored) == 1.0
    assert metrics.miou(PRED, ignored) == 1.0
    with pytest.raises(CompressError, match=r"miou needs \(N, classes, H, W\) outputs and \(N, H, W\) labels"):
        metrics.miou(PRED, LABELS[0])


def test_agreement_is_per_pixel_for_maps() -> None:
    ref = one_hot_map([[0, 1], [2, 2]])
    fid = metrics.fidelity(PRED, ref)
    assert fid["agreement"] == 0.75  # 3 of 4 pixels keep their class (a flattened arg-max would say 1 of 1 or 0)
    result = compare(metrics.Outputs(PRED, LABELS), metrics.Outputs(ref, LABELS), metric="agreement",
                     max_drop_samples=0)
    assert result.agreement == 0.75 and result.drop == 25.0
    assert result.drop_samples == 1 and result.changed == 1  # one pixel, in one sample
    assert not result.passed


def test_output_names_and_the_task_output() -> None:
    t = torch.zeros(2, 3)
    assert list(named(t)) == ["output"]
    assert list(named((t, t))) == ["output0", "output1"]
    assert list(named(OrderedDict(out=t, aux=t))) == ["out", "aux"]
    pair = namedtuple("Pair", "logits features")
    assert list(named(pair(t, t))) == ["logits", "features"]
    assert task_output(["out", "aux"]) == "out" and task_output(["output0", "output1"]) is None
    assert task_output(["a", "logits", "out"]) == "logits"
    assert select((t, t + 1), "output1") is not t
    with pytest.raises(CompressError, match=r"^'x' is not an output of the model \(it returns 'out', 'aux'\)$"):
        task_output(["out", "aux"], "x")
    with pytest.raises(CompressError, match="output 'output1' is a NoneType, not a tensor"):
        named((t, None))
    with pytest.raises(CompressError, match=r"name the one the metric applies to: metric: \{name: top1, output: output0\}"):
        select((t, t))


def test_every_output_is_compared_and_the_worst_decides() -> None:
    torch.manual_seed(0)
    logits, feats = torch.randn(8, 10), torch.randn(8, 16)
    labels = logits.argmax(1)
    ref = metrics.Outputs({"logits": logits, "features": feats}, labels, "logits")
    same = compare(metrics.Outputs({"logits": logits, "features": feats.clone()}, labels, "logits"), ref,
                   min_cosine=0.99)
    assert same.passed and set(same.outputs) == {"logits", "features"} and same.output == "logits"
    broken = feats.clone()
    broken[:, 0] += 10.0  # the second output only
    result = compare(metrics.Outputs({"logits": logits, "features": broken}, labels, "logits"), ref, min_cosine=0.99)
    assert result.drop == 0.0 and result.outputs["logits"]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert result.cosine == result.outputs["features"]["cosine"] < 0.99
    assert result.failures == [f"output 'features': cosine {result.cosine:.6f} < min_cosine 0.99"]
    other = metrics.Outputs({"logits": logits, "other": feats}, labels, "logits")
    with pytest.raises(CompressError, match="the model returns outputs 'logits', 'other' but the reference 'logits', "
                                            "'features'; they cannot be compared"):
        compare(other, ref)


def test_metric_spec_short_and_long_forms() -> None:
    assert metrics.MetricSpec.model_validate("miou") == metrics.MetricSpec(name="miou")
    long = metrics.MetricSpec.model_validate({"name": "top1", "output": "logits"})
    assert long.output == "logits" and long.model_dump() == {"name": "top1", "output": "logits"}
    assert metrics.MetricSpec(name="top1").model_dump() == "top1"  # resolved recipes keep the short form
