"""A Hugging Face BERT on token ids with an attention mask: train -> INT8 PTQ (attention included) -> opset-13 ONNX
-> check the ONNX Runtime engine against the float model.

    python examples/huggingface_bert.py [--out runs/hf-bert] [--epochs 10] [--samples 2048]

Needs ``pip install 'compress[transformers]'``. The model is a small ``BertForSequenceClassification`` built from
a ``transformers.BertConfig`` (random weights: nothing is downloaded; ``from_pretrained`` works the same way where
you can download). The data is ``compress.text_data.TopicTokens``, a generated 4-topic text task whose batches are
``{"input_ids", "attention_mask", "labels"}`` dicts, as a tokenizer and a Hugging Face collator give; put your
own tokenized dataset in its place. Takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import transformers
from torch.utils.data import DataLoader

import compress
from compress.text_data import TopicTokens


def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(1)
                         == b["labels"]).sum()) for b in loader)
    return right / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf-bert"), help="folder for the files written")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--samples", type=int, default=2048, help="training sentences generated")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    train = DataLoader(TopicTokens("train", samples=args.samples), batch_size=64, shuffle=True)
    calib = DataLoader(TopicTokens("train", samples=128), batch_size=64)
    test = DataLoader(TopicTokens("test", samples=512), batch_size=128)

    config = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=4)
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(args.epochs):                                  # your own loop, Hugging Face style
        model.train()
        for batch in train:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    print(f"float top1 {accuracy(model, test):.4f}")
    float_model = copy.deepcopy(model)

    # INT8: every Linear (Q/K/V, output, MLP, classifier) and both attention MatMuls. Hugging Face attention
    # calls F.scaled_dot_product_attention itself, so prepare finds those modules by running one example.
    example = {k: v[:1] for k, v in next(iter(test)).items() if k != "labels"}
    qmodel = compress.quant.prepare(model, target="onnxruntime", example_input=example)
    compress.ptq.calibrate(qmodel, calib, method="max")           # dict batches: the labels key is left out
    onnx_path = args.out / "bert_int8.onnx"
    info = compress.export.onnx(qmodel, example, onnx_path, opset=13)  # int64 inputs named input_ids/attention_mask
    print(f"exported {onnx_path}: {info.qdq_pairs} Q/DQ pairs")

    # The INT8 ONNX file in ONNX Runtime against the float PyTorch model; the metric reads the `logits` output.
    result = compress.check(onnx_path, reference=float_model, data=test, output="logits", max_drop=2.0)
    print(f"check: top1 {result.model_metric:.4f} (float {result.reference_metric:.4f}), drop {result.drop:.2f} pt, "
          f"agreement {result.agreement:.4f}, passed {result.passed}")
    raise SystemExit(0 if result.passed else 1)


if __name__ == "__main__":
    main()
