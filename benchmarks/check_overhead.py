"""Overhead of compress.check vs a plain loop running the same engine and PyTorch model over the data.

usage: python benchmarks/check_overhead.py [--repeats 5]
The engine is digits_cnn exported to ONNX and run in ONNX Runtime; the reference is the PyTorch
model; data is the digits test split (360 samples). Target: ratio <= 1.30.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from timing import best_of

import compress
from compress.data import build_loader, split_batch
from compress.export.onnxruntime import OrtEngine
from compress.recipe import DigitsData


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_cnn").eval()
    loader = build_loader(DigitsData(source="digits", split="test", batch_size=64), "eval")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        compress.export.onnx(model, torch.zeros(1, 1, 8, 8), path)
        engine = OrtEngine(path)

        def plain():
            with torch.no_grad():
                outs, refs = [], []
                for batch in loader:
                    x, _ = split_batch(batch)
                    outs.append(torch.from_numpy(engine.run(x.numpy())))
                    refs.append(model(x))
                torch.cat(outs), torch.cat(refs)

        def ours():
            compress.check(engine, reference=model, data=loader, max_drop=0.5)

        t_plain = best_of(plain, args.repeats)
        t_ours = best_of(ours, args.repeats)
    print("digits_cnn, digits test split (360 samples), batch 64")
    print(f"plain ORT + PyTorch loop : {t_plain * 1000:.1f} ms")
    print(f"compress.check           : {t_ours * 1000:.1f} ms")
    print(f"ratio check/plain = {t_ours / t_plain:.3f}  (target <= 1.30)")


if __name__ == "__main__":
    main()
