"""A token classifier ([N, T, classes] logits) through PTQ -> opset-13 ONNX -> ONNX Runtime -> check: compared
per token, with padding and masked positions left out and -100 labels out of top-1; a fault planted in one
position's logits is found and counted token by token."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from torch.utils.data import DataLoader

from compress.cli import main as cli_main
from compress.export.check import check
from compress.export.onnxruntime import OrtEngine
from compress.text_data import TaggedTokens, collate_trimmed

DATA = '{source: python, factory: "compress.text_data:tagged_tokens", kwargs: {split: %s, samples: 128}}'
RECIPE = f"""\
name: token-tagger
model: {{factory: "helpers_models:token_tagger"}}
data:
  train: {DATA % "train"}
  calibration: {DATA % "train"}
  eval: {{source: python, factory: "compress.text_data:tagged_tokens", kwargs: {{split: test, samples: 128}}, batch_size: 32}}
metric: top1
stages:
  - ptq: {{calibrator: max}}
  - export:
      onnx: {{opset: 13, target: onnxruntime}}
      engine: {{batch_sizes: [1], bench_iters: 2}}
      check: {{max_drop: 0.5, min_agreement: 0.99}}
"""
FAULT_CLASS, BUMP = 1, 1e3  # topic 1 (few tokens have it), 1000 above the rest: it wins wherever planted


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tagger")
    (root / "recipe.yaml").write_text(RECIPE)
    assert cli_main(["run", str(root / "recipe.yaml"), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


def test_token_classifier_runs_ptq_export_check_per_token(run: Path) -> None:
    report = json.loads((run / "report.json").read_text())
    data = TaggedTokens("test", samples=128)
    engine = OrtEngine(run / "model.onnx")
    logits = torch.cat([engine({"input_ids": data.input_ids[i:i + 32], "attention_mask": data.attention_mask[i:i + 32]})
                        for i in range(0, 128, 32)])
    counted = data.labels != -100
    by_hand = float((logits.argmax(2) == data.labels)[counted].double().mean())  # per labelled token
    check_ = report["check"]
    assert check_["model_metric"] == by_hand and check_["passed"]
    assert report["stages"][0]["metrics"]["top1"] > float((data.labels[counted] == 0).double().mean())  # > "all filler"
    # INT8 engine vs its fake-quant model: float rounding only, no token's arg-max moves
    assert check_["agreement"] == 1.0 and check_["changed"] == 0 and check_["drop_samples"] == 0
    assert "model_top1" not in check_["worst"][0]  # a per-token output has no one arg-max per sample
    out = onnx.load(run / "model.onnx").graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", "sequence", 5]


def _planted(engine: OrtEngine, position: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    def run(x: dict[str, torch.Tensor]) -> torch.Tensor:
        out = engine(x).clone()
        if out.shape[1] > position:  # batches padded to fewer tokens have no such position
            out[:, position, FAULT_CLASS] += BUMP
        return out
    return run


def _changed_by_hand(engine: OrtEngine, data: TaggedTokens, position: int) -> tuple[int, int]:
    """``(tokens the fault moves, labelled tokens it moves off a right answer minus onto one)`` at ``position``."""
    pred = engine({"input_ids": data.input_ids, "attention_mask": data.attention_mask}).argmax(2)[:, position]
    live = data.attention_mask[:, position] == 1
    moved = live & (pred != FAULT_CLASS)
    labels = data.labels[:, position]
    lost = int((moved & (pred == labels)).sum())
    gained = int((moved & (labels == FAULT_CLASS)).sum())
    return int(moved.sum()), lost - gained


@pytest.mark.parametrize("padding", ["fixed", "per batch"])
def test_a_fault_in_one_position_is_found_token_by_token(run: Path, padding: str) -> None:
    engine = OrtEngine(run / "model.onnx")
    data = TaggedTokens("test", samples=128)
    loader = DataLoader(data, batch_size=8, collate_fn=collate_trimmed if padding == "per batch" else None)
    tokens = int(data.attention_mask.sum())
    # position 5 is inside every sentence (8 tokens at least)
    moved, net = _changed_by_hand(engine, data, 5)
    assert moved > 100  # of 128 tokens at position 5, all but those already called topic 1
    result = check(_planted(engine, 5), engine, loader, metric="agreement", min_agreement=0.999, max_drop=None)
    assert result.drop_samples == result.changed == moved  # one token per sample, at position 5
    assert result.drop_unit == "tokens"  # what drop_samples counts, as `compress check` prints it
    assert result.agreement == pytest.approx(1 - moved / tokens, abs=0.5 / tokens)  # half a token
    assert result.failures == [f"agreement {result.agreement:.4f} < min_agreement 0.999"]
    top1 = check(_planted(engine, 5), engine, loader, metric="top1", max_drop=None)
    assert top1.drop_samples == net and net > 0  # labelled tokens lost net, as counted by hand
    # [CLS] (position 0): masked in, labelled -100: agreement sees the fault, top-1 does not
    cls = check(_planted(engine, 0), engine, loader, metric="top1", max_drop=0.0)
    assert cls.passed and cls.drop == 0.0 and cls.drop_samples == 0
    assert cls.outputs["output"]["agreement"] < 1.0
    # position 31: padding in most samples (mask 0, or cut off per batch); only the 32-token sentences count
    moved31, _ = _changed_by_hand(engine, data, 31)
    last = check(_planted(engine, 31), engine, loader, metric="agreement", max_drop=None)
    assert last.drop_samples == moved31 <= int(data.attention_mask[:, 31].sum()) < 32
