"""QAT + 2:4 sparsity in your own training loop, with your own torchvision model and a fresh optimizer.

    python examples/qat_sparse_own_loop.py [--steps 10] [--out DIR]

The loop is plain PyTorch. The model keeps its 2:4 masks itself and its weight quantizers follow the
weights, so no callback or optimizer hook is needed. The checkpoint is restored onto a freshly built
model (``compress.restore``: no factory needed) with identical outputs, then exported to ONNX.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import compress


def build_model() -> torch.nn.Module:
    return torchvision.models.resnet18(num_classes=4)


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Generated 32x32 images whose class is the colour channel that is brightest (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 4, (16,), generator=g)
        x = torch.randn(16, 3, 32, 32, generator=g) * 0.5
        x[y < 3, y[y < 3]] += 1.0  # classes 0-2 lift one channel; class 3 lifts none
        out.append((x, y))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, help="where the checkpoint and ONNX go (default: a temporary folder)")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = args.out or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    train, calib = batches(args.steps, seed=0), batches(4, seed=1)

    model = build_model()                                       # stands in for your trained float model
    sparse = compress.sparsity.apply_2to4(model)                # 2:4 masks, kept by the model's own layers
    qmodel = compress.quant.prepare(model, target="tensorrt")   # fake quantizers
    compress.ptq.calibrate(qmodel, calib, progress=False)
    optimizer = torch.optim.AdamW(qmodel.parameters(), lr=1e-3, weight_decay=0.01)  # a fresh optimizer
    qmodel.train()
    for step, (x, y) in enumerate(train):                       # your own loop: nothing from compress in it
        loss = F.cross_entropy(qmodel(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, len(train) - 1):
            print(f"step {step} loss {loss.item():.4f}")
    qmodel.eval()
    kept = compress.sparsity.verify_model(qmodel).sparse_layers
    print(f"sparse layers {len(kept)}/{len(sparse.layers)} after training")

    path = out / "qat_sparse.pt"
    compress.save(qmodel, path)                                 # no factory needed
    restored = compress.restore(build_model(), path).eval()     # onto a model you build
    x = calib[0][0]
    with torch.no_grad():
        same = torch.equal(qmodel(x), restored(x))
    print(f"identical outputs {same}")

    info = compress.export.onnx(restored, x[:1], out / "qat_sparse.onnx", target="tensorrt")
    onnx_sparse = compress.sparsity.verify_onnx(info.path).sparse_layers
    print(f"onnx {info.path.name}: {info.qdq_pairs} Q/DQ pairs, tensorrt rules "
          f"{'pass' if info.rules and info.rules.passed else 'FAIL'}, {len(onnx_sparse)} 2:4 layers")
    if not (same and len(kept) == len(sparse.layers) == len(onnx_sparse)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
