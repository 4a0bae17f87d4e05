"""The export options: the ONNX file, the engine (one options type per backend), the check and Triton.

The engine options are a union discriminated by ``backend``: each backend's class declares the options
that belong to it, so the schema says which engine an option applies to. An option of the other
backend is refused in one line naming the backend it belongs to.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from compress.config import SafeName, Strict
from compress.export.onnxruntime import Optimization
from compress.quant.spec import Target


class OnnxOptions(Strict):
    opset: Annotated[int, Field(ge=13, le=20)] = 13
    target: Target = Target.tensorrt
    dynamic_batch: bool = True


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"  # the non-quantized parts in float16, through casts written into DIR/model.fp16.onnx


# Batch sizes the engine is built, timed and served at: a bench input of 10^9 samples would need terabytes.
MAX_BATCH = 65536
Batch = Annotated[int, Field(gt=0, le=MAX_BATCH)]


class BatchProfile(Strict):
    """TensorRT's optimization profile for the dynamic batch: tuned for ``opt``, accepts ``min..max``."""

    min: Batch = 1
    opt: Batch | None = None  # default: the largest of batch_sizes
    max: Batch | None = None  # default: the largest of batch_sizes and triton.max_batch_size


class _EngineBase(Strict):
    """Options every backend takes; ``backend`` (the union's tag) is narrowed to one value by each backend."""

    backend: str
    precision: Precision = Precision.fp32
    keep_fp32: list[str] = Field(default_factory=list)  # op types or node names left in float32 by fp16
    batch_sizes: list[Batch] = Field(default_factory=lambda: [1, 8, 32])
    bench_iters: Annotated[int, Field(ge=0, le=100_000)] = 20

    @model_validator(mode="before")
    @classmethod
    def _other_backends_option(cls, data: Any) -> Any:
        """An option of another backend: say whose it is (Strict's unknown-key check runs after this one)."""
        if isinstance(data, dict):
            for key in data:
                owner = next((backend_name(b) for b in BACKENDS if key in b.model_fields), None)
                if key not in cls.model_fields and owner is not None:
                    # type unknown_key: the recipe's locator then names the option itself (file:line engine.KEY)
                    raise PydanticCustomError("unknown_key", "applies to backend {owner}, not {backend}",
                                              {"key": str(key), "owner": owner, "backend": backend_name(cls)})
        return data


class OnnxRuntimeEngine(_EngineBase):
    """ONNX Runtime (CPU): the optimised graph saved as DIR/engine.onnx."""

    backend: Literal["onnxruntime"] = "onnxruntime"
    threads: Annotated[int, Field(gt=0, le=1024)] | None = None
    # the level the engine is deployed at, so timed and checked at (ONNX Runtime's own default); the
    # engine file is saved at most at 'extended', which stays portable across CPUs
    optimization: Optimization = Optimization.all


class TensorRTEngine(_EngineBase):
    """TensorRT: a plan built for this GPU, saved as DIR/engine.plan."""

    backend: Literal["tensorrt"]
    profile: BatchProfile = Field(default_factory=BatchProfile)
    workspace_mb: Annotated[int, Field(gt=0)] | None = None
    timing_cache: str | None = None  # default DIR/timing.cache; point several runs at one file to share it


def _default_backend(value: Any) -> Any:
    """``backend`` may be left out (onnxruntime); anything but a mapping is refused as before the union."""
    if isinstance(value, dict):
        return value if "backend" in value else {**value, "backend": DEFAULT_BACKEND}
    if isinstance(value, _EngineBase):
        return value
    raise PydanticCustomError("model_type", "Input should be a valid dictionary or instance of EngineOptions")


# The one list of engine backends: a new backend is a class above, added here (and its build in export.steps).
EngineOptions = Annotated[
    Annotated[OnnxRuntimeEngine | TensorRTEngine, Field(discriminator="backend")], BeforeValidator(_default_backend)
]
BACKENDS: tuple[type[_EngineBase], ...] = get_args(get_args(EngineOptions)[0])  # nested Annotated flattens
DEFAULT_BACKEND = "onnxruntime"


def backend_name(cls: type[_EngineBase]) -> str:
    """The ``backend:`` value an options class answers to (``"tensorrt"`` for :class:`TensorRTEngine`)."""
    (name,) = get_args(cls.model_fields["backend"].annotation)
    return str(name)


BACKEND_NAMES: tuple[str, ...] = tuple(backend_name(cls) for cls in BACKENDS)


class CheckOptions(Strict):
    max_drop: Annotated[float, Field(ge=0)] | None = None  # points; 0.5 unless max_drop_samples is given
    max_drop_samples: Annotated[int, Field(ge=0)] | None = None  # samples lost net; top1/agreement metrics
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    min_cosine: Annotated[float, Field(ge=-1, le=1)] | None = None
    reference: Literal["model", "baseline"] = "model"

    @model_validator(mode="before")
    @classmethod
    def _default_drop(cls, data: Any) -> Any:
        """``max_drop: 0.5`` unless a drop in samples is asked for: the resolved recipe shows what is applied."""
        if isinstance(data, dict) and "max_drop" not in data and data.get("max_drop_samples") is None:
            return {**data, "max_drop": 0.5}
        return data


class TritonOptions(Strict):
    name: SafeName  # the model's folder and name in the repository
    max_batch_size: Annotated[int, Field(ge=0, le=MAX_BATCH)] = 32  # 0: no batching (then the batch dim is part of dims)
