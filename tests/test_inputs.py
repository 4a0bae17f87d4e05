"""Token inputs: batches with several input tensors (a tuple, or a dict by name) through data, evaluation,
calibration, export and the ONNX Runtime engine; a Hugging Face BERT on a generated text task end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress import inputs, metrics, quant
from compress.data import make_loader, split_batch
from compress.errors import DataError
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import OrtEngine
from compress.ptq.calibrate import calibrate
from compress.text_data import TopicTokens


class TupleTokens(nn.Module):
    """``forward(ids, mask)``: mean of the unmasked token embeddings -> logits."""

    def __init__(self, vocab: int = 256, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(vocab, width), nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).float()
        return self.fc((self.embed(ids) * m).sum(1) / m.sum(1).clamp(min=1))


def test_split_batch_layouts() -> None:
    ids, mask, y = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), torch.zeros(2)
    x, label = split_batch({"input_ids": ids, "attention_mask": mask, "labels": y})
    assert isinstance(x, dict) and list(x) == ["input_ids", "attention_mask"] and label is y
    x, label = split_batch([[ids, mask], y])  # default_collate of ((ids, mask), y) samples
    assert isinstance(x, tuple) and len(x) == 2 and label is y
    image = torch.zeros(2, 3)
    x, label = split_batch({"image": image, "label": y})  # one named input: model(x), as before
    assert x is image and label is y
    with pytest.raises(DataError, match=r"a batch of 3 items, which reads as neither x nor \(x, y\)"):
        split_batch([ids, mask, y])  # TensorDataset(ids, mask, labels) would otherwise take the mask for labels
    with pytest.raises(DataError, match="a dict of named input tensors"):
        split_batch({"input_ids": [1, 2], "labels": y})


def test_topic_tokens_pad_and_label_by_topic_counts() -> None:
    data = TopicTokens("test", samples=64)
    assert data.input_ids.dtype == torch.long and data.input_ids.shape == (64, 32)
    lengths = data.attention_mask.sum(1)
    assert bool((data.input_ids[:, 0] == 1).all()) and bool((lengths >= 8).all())
    assert bool((data.input_ids * (1 - data.attention_mask) == 0).all())  # padding is id 0, mask 0
    topics = torch.arange(2, 34).view(4, 8)
    counts = torch.stack([torch.isin(data.input_ids, topics[c]).sum(1) for c in range(4)], 1)
    assert torch.equal(counts.argmax(1), data.labels)  # the label is the topic with the most words
    assert not torch.equal(TopicTokens("train", samples=64).input_ids, data.input_ids)


@pytest.mark.parametrize("layout", ["tuple", "dict"])
def test_several_inputs_export_with_names_and_a_dynamic_sequence(layout: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = TupleTokens().eval()
    data = TopicTokens("test", samples=16)
    x: inputs.Inputs = ((data.input_ids, data.attention_mask) if layout == "tuple"
                        else {"ids": data.input_ids, "mask": data.attention_mask})
    export_onnx(model, inputs.take(x, slice(0, 1)), tmp_path / "m.onnx", opset=13)
    proto = onnx.load(tmp_path / "m.onnx")
    names = ["input0", "input1"] if layout == "tuple" else ["ids", "mask"]
    assert [i.name for i in proto.graph.input] == names
    for i in proto.graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    engine = OrtEngine(tmp_path / "m.onnx")
    shorter = inputs.apply(x, lambda t: t[:5, :20])  # another batch and sequence length than exported
    want = inputs.call_model(model, shorter).detach()
    assert torch.allclose(engine(shorter), want, rtol=1e-5, atol=1e-5)  # fp32, one summation order apart
    samples = [(inputs.take(x, i), y) for i, y in enumerate(data.labels)]  # ((ids, mask), y) or ({ids, mask}, y)
    outs = metrics.collect_many([model, engine], make_loader(samples, "eval", batch_size=8, shuffle=False))
    assert torch.equal(outs[0].logits.argmax(1), outs[1].logits.argmax(1))


def test_calibration_never_quantizes_token_ids() -> None:
    model = TupleTokens()
    qmodel = quant.prepare(model, "onnxruntime")
    data = TopicTokens("train", samples=32)
    loader = make_loader(data, "calibration", batch_size=16, shuffle=False)
    calibrate(qmodel, ({"ids": b["input_ids"], "mask": b["attention_mask"]} for b in loader), "max")
    names = [n for n, _ in quant.quantizers(qmodel)]
    assert names and all(n.startswith(("fc.", "act_quant.")) for n in names), names  # the Linear, nothing on ids


@pytest.mark.slow
def test_bert_on_token_ids_and_mask_trains_quantizes_and_checks(write_recipe, cli, tmp_path) -> None:
    """A Hugging Face BERT (2 layers, width 32) on the generated topic task: train -> PTQ with INT8 attention ->
    opset-13 ONNX with named int64 inputs -> ONNX Runtime engine with integer MatMuls -> check."""
    pytest.importorskip("transformers")
    source = '{source: python, factory: "compress.text_data:topic_tokens", kwargs: {split: %s, samples: %d}}'
    recipe = write_recipe(f"""
        name: bert-tokens
        model: {{factory: "compress.zoo:bert_tiny", kwargs: {{hidden_size: 32, intermediate_size: 64, num_heads: 2}}}}
        data:
          train: {source % ("train", 2048)}
          calibration: {source % ("train", 128)}
          eval: {source % ("test", 256)}
        metric: {{name: top1, output: logits}}
        seed: 0
        stages:
          - train: {{finetune: {{epochs: 10, lr: 0.005, optimizer: adamw}}}}
          - ptq: {{calibrator: max, limit: 128}}
          - export:
              onnx: {{opset: 13, target: onnxruntime}}
              engine: {{backend: onnxruntime, batch_sizes: [1, 4], bench_iters: 2}}
              check: {{max_drop: 2.0, min_agreement: 0.95}}
    """)
    result = cli("run", recipe, "--out", tmp_path / "run", "--quiet")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    trained, ptq = report["stages"][0], report["stages"][1]
    assert trained["metrics"]["top1"] > 0.6  # 4 classes: chance 0.25; measured 0.879 (225 of 256 samples)
    assert ptq["attention"] == {"modules": 2, "matmuls": "int8"}
    assert report["engine"]["int8_macs_fraction"] > 0.9  # every projection, MLP and attention MatMul
    assert report["check"]["passed"]
    proto = onnx.load(tmp_path / "run" / "model.onnx")
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == [
        ("input_ids", onnx.TensorProto.INT64), ("attention_mask", onnx.TensorProto.INT64)]
    assert np.isfinite(report["engine"]["latency_ms"]["4"])
