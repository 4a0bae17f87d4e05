"""Your own torchvision model on your own data: train -> prune -> INT8 PTQ -> ONNX -> check against the float model.

    python examples/own_torchvision_model.py [--out runs/own-resnet18] [--samples 1024] [--epochs 3]

Nothing here is specific to compress's demo: the model is ``torchvision.models.resnet18(num_classes=10)``
built by you, the data a ``TensorDataset`` you make (here: 10 classes of noisy 16x16 RGB patterns, generated,
so nothing is downloaded; put your own ``Dataset`` in its place). compress supplies the verbs around your code:
``prune.channels``, ``quant.prepare`` + ``ptq.calibrate``, ``export.onnx``, ``check`` and ``save``/``load``.
Takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import compress


def make_data(samples: int, seed: int, size: int = 16) -> TensorDataset:
    """A stand-in for your data: each class is a fixed smooth random RGB pattern; a sample is that pattern plus noise
    (put your own ``Dataset`` here: any batches of ``(inputs, labels)`` work)."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=(size, size),
                                               mode="bilinear")
    g.manual_seed(seed)
    labels = torch.randint(0, 10, (samples,), generator=g)
    return TensorDataset(patterns[labels] + 0.7 * torch.randn(samples, 3, size, size, generator=g), labels)


def train(model: torch.nn.Module, loader: DataLoader, epochs: int) -> None:
    """Your own training loop (compress.finetune would do the same, with AMP/DDP/keep-best)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/own-resnet18"), help="folder for the files written")
    parser.add_argument("--samples", type=int, default=1024, help="training samples generated")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs, before and after pruning")
    args = parser.parse_args()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    train_loader = DataLoader(make_data(args.samples, seed=1), batch_size=32, shuffle=True)
    calib_loader = DataLoader(make_data(128, seed=2), batch_size=64)
    test_loader = DataLoader(make_data(512, seed=3), batch_size=128)
    example = next(iter(test_loader))[0][:1]

    model = torchvision.models.resnet18(num_classes=10)          # your model, built your way
    train(model, train_loader, args.epochs)
    float_model = copy.deepcopy(model)                           # the reference the engine is checked against

    compress.prune.channels(model, example, ratio=0.3)            # in place: physically fewer channels
    train(model, train_loader, args.epochs)                      # recover what pruning cost

    qmodel = compress.quant.prepare(model, target="onnxruntime")  # fake quantizers; torch.nn is not patched
    compress.ptq.calibrate(qmodel, calib_loader, method="percentile", limit=128)
    onnx_path = args.out / "model_int8.onnx"
    info = compress.export.onnx(qmodel, example, onnx_path)      # opset 13, dynamic batch, Q/DQ with int8 weights
    print(f"exported {onnx_path}: {info.qdq_pairs} Q/DQ pairs")

    # The INT8 ONNX file in ONNX Runtime against the float, unpruned PyTorch model, on data neither was trained on.
    result = compress.check(onnx_path, reference=float_model, data=test_loader, max_drop=1.0)
    print(f"check: top1 {result.model_metric:.4f} (float {result.reference_metric:.4f}), drop {result.drop:.2f} pt, "
          f"agreement {result.agreement:.4f}, passed {result.passed}")

    # A pickle-free checkpoint: the factory and its kwargs rebuild the pruned, quantized model elsewhere.
    ckpt = args.out / "model_int8.pt"
    compress.save(qmodel, ckpt, factory="torchvision.models:resnet18", kwargs={"num_classes": 10})
    reloaded = compress.load(ckpt).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(example), qmodel.eval()(example))
    print(f"saved {ckpt}; reloaded outputs identical: {same}")
    raise SystemExit(0 if result.passed and same else 1)


if __name__ == "__main__":
    main()
