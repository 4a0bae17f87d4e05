"""TensorRT engine backend (the ``tensorrt`` extra; needs a CUDA GPU): ONNX -> serialized engine -> inference.

Written against the TensorRT 10/11 Python API:

- the network is strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: opt-in in 10,
  always on in 11). Precision comes from the ONNX file alone: INT8 from its QuantizeLinear/
  DequantizeLinear (explicit quantization; the calibrator API is deprecated in 10.1 and gone in 11),
  FP16 from the float16 types :mod:`compress.export.fp16` writes. No precision builder flag is set;
- ``BuilderFlag.SPARSE_WEIGHTS`` when the exported weights are 2:4 (TensorRT then picks sparse
  kernels where they are faster);
- an optimization profile (min/opt/max) for a dynamic batch dimension, a workspace limit, and a
  timing cache file reused across builds;
- the engine inspector's per-layer JSON (``ProfilingVerbosity.DETAILED``) saved beside the engine,
  with a summary of which layers run INT8/FP16 and which picked sparse kernels;
- inference through torch CUDA tensors (``execute_async_v3`` on torch's current stream), no pycuda.

Nothing here pretends: without ``tensorrt`` or a GPU every entry point raises a
:class:`CompressError` naming what is missing (:func:`why_unavailable`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress import io
from compress.errors import CompressError, first_line
from compress.export.model_file import ENGINE_SUFFIXES as ENGINE_SUFFIXES  # re-exported
from compress.outputs import SINGLE

MIN_MAJOR = 10


def why_unavailable() -> str | None:
    """Why TensorRT engines cannot be built or run here, or None when they can."""
    try:
        import tensorrt as trt
    except ImportError:
        return "the tensorrt package is not installed (pip install 'compress[tensorrt]')"
    except Exception as exc:  # the PyPI stub raises at import when it could not fetch the real wheel
        return f"the tensorrt package fails to import: {first_line(exc)}"
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_MAJOR:
        return f"TensorRT {version} is too old: compress needs {MIN_MAJOR} or later"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    return None


def _tensorrt(what: str) -> Any:
    reason = why_unavailable()
    if reason is not None:
        raise CompressError(f"{what}: TensorRT cannot run here: {reason}")
    import tensorrt as trt

    return trt


@dataclass(frozen=True)
class Profile:
    """Batch sizes of the optimization profile: TensorRT tunes for ``opt`` and accepts ``min..max``."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise CompressError(f"tensorrt profile: need 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


def profile_shapes(dims: Sequence[int | str | None], profile: Profile | None, name: str = "input"
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) shapes for one ONNX input whose dims are ints (fixed) or names/None (dynamic).

    Only the batch dimension (dim 0) may be dynamic. A fully fixed input needs no profile (None).

    Raises:
        CompressError: a dynamic dimension other than the batch, or a dynamic batch without a profile.
    """
    dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
    if not dynamic:
        return None
    if dynamic != [0]:
        raise CompressError(f"tensorrt: input '{name}' has dynamic dimensions {dynamic}; only the batch "
                            "dimension (0) may be dynamic")
    if profile is None:
        raise CompressError(f"tensorrt: input '{name}' has a dynamic batch dimension and needs a profile (min/opt/max)")
    rest = tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]
    return (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest)


def _onnx_inputs(onnx_path: Path) -> list[tuple[str, list[int | str | None]]]:
    from compress.export.declared_inputs import graph_inputs

    inputs = []
    for value in graph_inputs(onnx_path):
        dims: list[int | str | None] = []
        for d in value.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        inputs.append((value.name, dims))
    return inputs


# --- the engine inspector's per-layer report --------------------------------------------------------

_DTYPE_WORDS = (  # (pattern in a Format/DataType string, our name), checked in order
    (re.compile(r"\bint8\b|\bi8\b", re.I), "int8"),
    (re.compile(r"\bfp8\b|e4m3", re.I), "fp8"),
    (re.compile(r"\bbf16\b|bfloat16", re.I), "bf16"),
    (re.compile(r"\bfp16\b|\bhalf\b", re.I), "fp16"),
    (re.compile(r"\bfp32\b|\bfloat\b", re.I), "fp32"),
    (re.compile(r"\bint32\b", re.I), "int32"),
    (re.compile(r"\bint64\b", re.I), "int64"),
    (re.compile(r"\bbool\b", re.I), "bool"),
)
_RANK = {"int8": 0, "fp8": 0, "fp16": 1, "bf16": 1, "fp32": 2}


def _dtype(tensor: dict[str, Any]) -> str | None:
    """Data type of one inspector tensor entry: TensorRT 10 writes "Format/Datatype", 11 "DataType"."""
    text = " ".join(str(tensor.get(k, "")) for k in ("DataType", "Datatype", "Format/Datatype", "Format/DataType"))
    for pattern, name in _DTYPE_WORDS:
        if pattern.search(text):
            return name
    return None


def summarize_layers(info: dict[str, Any], sparse_from_log: Sequence[str] = ()) -> dict[str, Any]:
    """Which engine layers compute in which precision, and which run sparse kernels.

    ``info`` is the inspector's JSON (``get_engine_information(LayerInformationFormat.JSON)``). A
    layer's precision is the lowest among its input tensors' data types (an INT8 convolution reads
    int8; a reformat or cast layer is counted by what it reads). Sparse layers are those whose tactic
    name says ``sparse`` plus those TensorRT's build log named as sparse (``sparse_from_log``).
    Layer entries that are plain strings (built without DETAILED verbosity) are counted as unknown.
    """
    layers = info.get("Layers", [])
    by_precision: dict[str, int] = {}
    int8_layers, sparse = [], []
    for layer in layers:
        if not isinstance(layer, dict):
            by_precision["unknown"] = by_precision.get("unknown", 0) + 1
            continue
        kinds = [k for k in (_dtype(t) for t in layer.get("Inputs", []) if isinstance(t, dict)) if k in _RANK]
        precision = min(kinds, key=_RANK.__getitem__) if kinds else "unknown"
        by_precision[precision] = by_precision.get(precision, 0) + 1
        name = str(layer.get("Name", "?"))
        if precision == "int8":
            int8_layers.append(name)
        if "sparse" in str(layer.get("TacticName", "")).lower():
            sparse.append(name)
    sparse += [n for n in sparse_from_log if n not in sparse]
    return {"layers": len(layers), "by_precision": dict(sorted(by_precision.items())), "int8_layers": int8_layers,
            "sparse_layers": sparse}


_SPARSE_PICKED = re.compile(r"picked sparse implementation for layers?:\s*(.*)", re.I)


def sparse_layers_from_log(messages: Sequence[str]) -> list[str]:
    """Layer names from TensorRT's ``(Sparsity) TRT inference plan picked sparse implementation for
    layers: a, b`` build-log line (INFO level)."""
    names: list[str] = []
    for message in messages:
        match = _SPARSE_PICKED.search(message)
        if match:
            names += [n.strip() for n in match.group(1).split(",") if n.strip()]
    return names


# --- build ----------------------------------------------------------------------------------------


@dataclass
class BuildInfo:
    """What a build did; ``layers`` is :func:`summarize_layers` of the saved inspector JSON."""

    engine: str
    tensorrt: str
    seconds: float
    strongly_typed: bool
    sparse_weights: bool
    profile: dict[str, list[list[int]]] = field(default_factory=dict)
    workspace_mb: int | None = None
    timing_cache: str | None = None
    layers_json: str | None = None
    layers: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logger(trt: Any) -> Any:
    """A TensorRT logger that keeps warnings/errors and the INFO lines about sparsity."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []
            self.problems: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            levels = trt.ILogger.Severity
            if severity in (levels.INTERNAL_ERROR, levels.ERROR, levels.WARNING):
                self.problems.append(str(msg))
            elif "sparsity" in str(msg).lower() or "sparse" in str(msg).lower():
                self.messages.append(str(msg))

    return Logger()


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    profile: Profile | None = None,
    workspace_mb: int | None = None,
    sparse_weights: bool = False,
    timing_cache: str | os.PathLike[str] | None = None,
    layers_json: str | os.PathLike[str] | None = None,
) -> tuple[TrtEngine, BuildInfo]:
    """Build ``onnx_path`` into a serialized engine at ``engine_path`` (atomically) and load it.

    Args:
        profile: batch sizes for a dynamic batch dimension (required when the ONNX has one).
        workspace_mb: cap on TensorRT's scratch memory (default: TensorRT's, the device's memory).
        sparse_weights: set ``BuilderFlag.SPARSE_WEIGHTS`` (the weights should be 2:4).
        timing_cache: file read before the build (when it exists) and written after, so later builds
            of similar networks skip kernel timing.
        layers_json: where to save the engine inspector's per-layer JSON.

    Raises:
        CompressError: TensorRT or a GPU is missing; the ONNX file does not parse; the build fails.
    """
    trt = _tensorrt(f"build {engine_path}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise CompressError(f"{onnx_path}: file not found")
    logger = _logger(trt)
    builder = trt.Builder(logger)
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(typed_flag) if typed_flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise CompressError(f"TensorRT cannot parse {onnx_path}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    flag = getattr(trt.BuilderFlag, "SPARSE_WEIGHTS", None)
    if sparse_weights:
        if flag is None:
            raise CompressError(f"build {engine_path}: this TensorRT {trt.__version__} has no SPARSE_WEIGHTS flag")
        config.set_flag(flag)
    shapes: dict[str, list[list[int]]] = {}
    opt_profile = None
    for name, dims in _onnx_inputs(onnx_path):
        triple = profile_shapes(dims, profile, name)
        if triple is None:
            continue
        if opt_profile is None:
            opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(name, *triple)
        shapes[name] = [list(s) for s in triple]
    if opt_profile is not None:
        config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    notes: list[str] = []
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # made by another TensorRT version or GPU
        notes.append(f"timing cache {cache_path} was made by another TensorRT version or GPU; started a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        why = logger.problems[-1] if logger.problems else "no reason given"
        raise CompressError(f"TensorRT could not build an engine from {onnx_path}: {why}")
    with io.atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    if cache_path is not None:
        with io.atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(cache.serialize()))  # the builder added this build's timings to it
    engine = TrtEngine(engine_path)
    info = BuildInfo(
        engine=str(engine_path), tensorrt=str(trt.__version__), seconds=round(seconds, 2),
        strongly_typed=typed_flag is not None or int(str(trt.__version__).split(".")[0]) >= 11, sparse_weights=sparse_weights, profile=shapes,
        workspace_mb=workspace_mb, timing_cache=str(cache_path) if cache_path is not None else None,
        warnings=notes + logger.problems[:20],
    )
    layers = engine.layer_information()
    if layers_json is not None:
        io.write_json(layers_json, layers)
        info.layers_json = str(layers_json)
    info.layers = summarize_layers(layers, sparse_layers_from_log(logger.messages))
    return engine, info


# --- inference ------------------------------------------------------------------------------------


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8, trt.int32: torch.int32,
             trt.bool: torch.bool}
    for attr, tdtype in (("int64", torch.int64), ("bfloat16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, attr):
            table[getattr(trt, attr)] = tdtype
    if dtype not in table:
        raise CompressError(f"tensorrt: engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


def split_batch(x: torch.Tensor, min_batch: int, max_batch: int) -> list[tuple[torch.Tensor, int]]:
    """``x`` cut into pieces of at most ``max_batch`` rows, each ``(piece, rows that are real)``: a piece
    shorter than ``min_batch`` is padded with zeros up to it (its padded outputs are dropped)."""
    pieces = []
    for start in range(0, x.shape[0], max_batch):
        piece = x[start : start + max_batch]
        n = piece.shape[0]
        if n < min_batch:
            piece = torch.cat([piece, piece.new_zeros(min_batch - n, *piece.shape[1:])])
        pieces.append((piece, n))
    return pieces


class TrtEngine:
    """A serialized TensorRT engine, callable on torch tensors like :class:`OrtEngine`.

    ``infer(x)`` returns the output on the GPU; calling the engine returns it as a float32 CPU tensor.
    Single-input engines (what :func:`compress.export.onnx.export_onnx` writes).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CompressError(f"engine {self.path}: file not found")
        trt = _tensorrt(f"engine {self.path}")
        self._trt = trt
        logger = _logger(trt)
        self._logger = logger  # TensorRT keeps a pointer to it: it must live as long as the runtime
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            why = logger.problems[-1] if logger.problems else "corrupt, or built by another TensorRT version or GPU"
            raise CompressError(f"engine {self.path}: TensorRT cannot load it: {why}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1 or not self.outputs:
            raise CompressError(f"engine {self.path}: has inputs {self.inputs} and outputs {self.outputs}; compress "
                                "runs engines with one input and at least one output")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)  # not the legacy default stream, which makes TensorRT sync more
        batch = int(self.engine.get_tensor_shape(self.inputs[0])[0])
        if batch > 0:  # built without a dynamic batch: every call takes exactly this batch
            self.min_batch = self.max_batch = batch
        else:
            low, _, high = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Run a batch of any size (split into pieces of the profile's largest batch, a piece below its
        smallest padded with zeros); the first output, on the GPU, after the stream has finished."""
        pieces = [self._run(piece)[:n] for piece, n in split_batch(x, self.min_batch, self.max_batch)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_all(x)[0]

    def _run_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        name = self.inputs[0]
        x = x.to(self.device, _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))).contiguous()
        if not self.context.set_input_shape(name, tuple(x.shape)):
            raise CompressError(f"engine {self.path}: input shape {list(x.shape)} is outside the engine's profile")
        self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            buf = torch.empty(shape, dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(out)), device=self.device)
            self.context.set_tensor_address(out, buf.data_ptr())
            outs.append(buf)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input copy and allocations first
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise CompressError(f"engine {self.path}: TensorRT failed to run the batch")
        self.stream.synchronize()
        return outs

    def __call__(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The output as a float32 CPU tensor; ``{name: tensor}`` for engines with other or several outputs
        (named as the export named the model's, so they pair with the model's: :mod:`compress.outputs`)."""
        if self.outputs == [SINGLE]:
            return self.infer(x).float().cpu()
        pieces = [[o[:n] for o in self._run_all(piece)] for piece, n in split_batch(x, self.min_batch, self.max_batch)]
        return {name: torch.cat([p[i] for p in pieces]).float().cpu() for i, name in enumerate(self.outputs)}

    def layer_information(self) -> dict[str, Any]:
        """The engine inspector's JSON for the whole engine (per-layer detail when built DETAILED)."""
        inspector = self.engine.create_engine_inspector()
        text = inspector.get_engine_information(self._trt.LayerInformationFormat.JSON)
        data: dict[str, Any] = json.loads(text)
        return data
