"""What a quantizer does (:class:`QuantSpec`) and where a quantized model is headed (:class:`Target`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Target(str, Enum):
    """Deployment engine; decides where Q/DQ nodes go and how activations are stored.

    - ``tensorrt``: int8 symmetric activations (zero point 0) at the inputs of Conv/Gemm/MatMul and
      on the identity input of residual adds (TensorRT's explicit-quantization placement).
    - ``onnxruntime``: uint8 activations quantized once per tensor at the inputs of every
      quantizable op and the outputs of pooling, which ONNX Runtime's CPU provider fuses into
      QLinearConv / QGemm / QLinearAdd / QLinearGlobalAveragePool.
    """

    tensorrt = "tensorrt"
    onnxruntime = "onnxruntime"


@dataclass(frozen=True)
class QuantSpec:
    """A quantizer's descriptor.

    Attributes:
        num_bits: integer width (8 is what ONNX QuantizeLinear carries).
        axis: ``None`` for one scale per tensor, else the channel axis of per-channel scales.
        unsigned: store as uint8 (zero point 0 for tensors calibrated non-negative, else the
            mid-point); ``False`` stores int8 with zero point 0.
    """

    num_bits: int = 8
    axis: int | None = None
    unsigned: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.num_bits <= 8:
            raise ValueError(f"num_bits must be within 2..8, not {self.num_bits}")

    def qrange(self, nonneg: bool) -> tuple[int, int, int, float]:
        """``(quant_min, quant_max, zero_point, levels)``: ``scale = amax / levels``."""
        if self.unsigned:
            qmax = 2**self.num_bits - 1
            if nonneg:
                return 0, qmax, 0, float(qmax)
            mid = 2 ** (self.num_bits - 1)
            return 0, qmax, mid, float(mid - 1)
        half = 2 ** (self.num_bits - 1)
        return -half, half - 1, 0, float(half - 1)


def activation_spec(target: Target) -> QuantSpec:
    return QuantSpec(unsigned=target is Target.onnxruntime)
