"""PyTorch eager on a CUDA GPU: FP32 vs FP16 vs our fake-quant (INT8 Q/DQ simulated in float) model, for the record.

usage: python benchmarks/gpu_eager_precision.py [--batch-sizes 1 32 128] [--size 224] [--iters 50]

This is what a user's training-side model costs before any engine is built: fake quantization runs
extra float ops, so it is *slower* than FP32 in eager mode; only an engine (TensorRT) turns the Q/DQ
into INT8 kernels. Without a CUDA GPU the script prints why and exits 0.

Model: torchvision resnet18 (random weights, 1000 classes; nothing is downloaded) at ``--size`` x ``--size``,
channels-first, batch from ``--batch-sizes``. FP16 is ``model.half()`` on half inputs. Fake-quant is
``compress.quant.prepare(model, "tensorrt")`` calibrated (max) on 64 random images. Time per batch:
median of ``--iters`` CUDA-event-timed calls (5 back-to-back calls each) after 10 warm-up calls, the three
variants measured one after another per batch size. Agreement: top-1 of FP16 / fake-quant vs FP32 on the
timed batch (random inputs and weights, so this only shows the numerics are sane).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
from timing import cuda_ms

import compress
from compress.ptq.calibrate import calibrate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU (torch.cuda.is_available() is False); run this where one is")
        return 0
    import torchvision

    torch.manual_seed(0)
    device = torch.device("cuda")
    fp32 = torchvision.models.resnet18(weights=None).eval().to(device)
    fp16 = copy.deepcopy(fp32).half()
    fq = compress.quant.prepare(copy.deepcopy(fp32).cpu(), "tensorrt").to(device).eval()
    calibrate(fq, [torch.randn(64, 3, args.size, args.size, device=device)], "max")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | resnet18 {args.size}x{args.size}")
    print(f"{'batch':>5} {'fp32 ms':>9} {'fp16 ms':>9} {'fakeq ms':>9} {'fp16/fp32':>10} {'fakeq/fp32':>11} "
          f"{'agree16':>8} {'agreeFQ':>8}")
    with torch.inference_mode():
        for bs in args.batch_sizes:
            x = torch.randn(bs, 3, args.size, args.size, device=device)
            xh = x.half()
            runs = {"fp32": lambda: fp32(x), "fp16": lambda: fp16(xh), "fq": lambda: fq(x)}  # noqa: B023
            ms = {k: statistics.median(cuda_ms(fn, args.iters, 5, 10)) for k, fn in runs.items()}
            ref = fp32(x).argmax(1)
            agree16 = (fp16(xh).float().argmax(1) == ref).float().mean().item()
            agree_fq = (fq(x).argmax(1) == ref).float().mean().item()
            print(f"{bs:>5} {ms['fp32']:>9.3f} {ms['fp16']:>9.3f} {ms['fq']:>9.3f} {ms['fp16'] / ms['fp32']:>10.2f} "
                  f"{ms['fq'] / ms['fp32']:>11.2f} {agree16:>8.3f} {agree_fq:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
