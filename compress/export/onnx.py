"""PyTorch -> ONNX (TorchScript exporter, ``dynamo=False``: the path that yields opset 13)."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from compress import io, quant
from compress.attention import explicit_attention
from compress.errors import CompressError, first_line
from compress.export import qdq
from compress.export.exporter_output import captured_fds, export_error
from compress.export.tensorrt_rules import RulesReport, check_tensorrt
from compress.inputs import Inputs, call_model, export_args, move_inputs, tensors
from compress.inputs import names as input_names
from compress.outputs import SINGLE, named
from compress.quant.spec import Target

INPUT_NAME, OUTPUT_NAME = "input", SINGLE


@dataclass(frozen=True)
class OnnxInfo:
    """What was exported. ``qdq_pairs`` counts activation Q->DQ pairs, ``int8_weights`` weights
    stored as int8 initializers behind a DequantizeLinear; ``rules`` is the TensorRT rules check
    (quantized models exported for the ``tensorrt`` target)."""

    path: Path
    opset: int
    nodes: int
    qdq_pairs: int
    target: str | None = None
    int8_weights: int = 0
    int32_biases: int = 0
    rules: RulesReport | None = None


def count_qdq_pairs(model: onnx.ModelProto) -> int:
    """QuantizeLinear nodes whose output feeds a DequantizeLinear."""
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    return sum(
        1
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and "DequantizeLinear" in consumers.get(node.output[0], [])
    )


def _output_names(model: nn.Module, example_input: Inputs) -> list[str]:
    """The ONNX output names: the model's output names (:func:`compress.outputs.named`: dict keys,
    namedtuple fields, ``output0``, ``output1``, ... for a tuple/list; ``output`` for one tensor),
    from one forward pass on the example; the exporter flattens the outputs in that same order."""
    try:
        with torch.no_grad():
            names = list(named(call_model(model, move_inputs(example_input, "cpu"))))
    except CompressError as exc:
        raise CompressError(f"export: {exc}") from None
    except Exception as exc:  # the forward itself fails: the exporter would say the same, less clearly
        raise CompressError(f"ONNX export failed: {first_line(exc)}") from None
    clash = set(names) & set(input_names(example_input))
    if clash:
        raise CompressError(f"export: the model names an output '{sorted(clash)[0]}', which is an ONNX input's name")
    return names


def _in_signature_order(model: nn.Module, example_input: Inputs) -> Inputs:
    """Named inputs in the order of ``forward``'s parameters: the exporter passes a trailing dict by signature
    order, so the ONNX input names must follow it."""
    if not isinstance(example_input, dict):
        return example_input
    order = list(inspect.signature(model.forward).parameters)
    return dict(sorted(example_input.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _input_axes(example_input: Inputs) -> dict[str, dict[int, str]]:
    """A dynamic batch on every input, and a dynamic sequence on integer (token) inputs of 2 or more dims."""
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(input_names(example_input), tensors(example_input), strict=True):
        axes[name] = {0: "batch", 1: "sequence"} if t.dim() >= 2 and not t.is_floating_point() else {0: "batch"}
    return axes


def export_onnx(
    model: nn.Module,
    example_input: Inputs,
    path: str | os.PathLike[str],
    *,
    opset: int = 13,
    dynamic_batch: bool = True,
    target: Target | str | None = None,
    calibration: Iterable[Any] | None = None,
) -> OnnxInfo:
    """Export ``model`` (in eval mode, on the CPU) to ``path`` atomically and run ``onnx.checker``.

    A quantized model (see :func:`compress.quant.prepare`) exports with QuantizeLinear/
    DequantizeLinear: BatchNorm folded into the convolutions exactly, weights stored as int8, and
    for ``onnxruntime`` int32 biases. For ``tensorrt`` the graph is checked against TensorRT's Q/DQ
    rules (``OnnxInfo.rules``). Outputs are named as :func:`compress.outputs.named` names them, each
    with a dynamic batch axis when ``dynamic_batch``.

    Args:
        target: ``tensorrt`` or ``onnxruntime`` (default: the target the model was quantized for). Another target
            than that exports a copy whose quantizers are placed and typed for it, with the ranges the model
            calibrated or trained (:func:`compress.quant.retarget`); the model itself is left as it is.
        calibration: batches for the tensors only the other target quantizes (e.g. a Conv+BN branch feeding a
            residual add, which TensorRT fuses and ONNX Runtime quantizes); asked for by name when needed.

    Raises:
        CompressError: the model cannot be traced/exported, is quantized but never calibrated, cannot be
            re-placed for ``target`` (quantized attention), or the result fails the checker.
    """
    path = Path(path)
    quantized = quant.is_quantized(model)
    wanted = quant.to_target(target) if target is not None else None
    if quantized:
        own = quant.target_of(model) or Target.tensorrt
        if wanted is not None and wanted is not own:
            model = quant.retarget(model, wanted, calibration)  # a copy placed for the target asked for; the model stays as it is
        wanted = wanted or own
        missing = quant.uncalibrated(model)
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CompressError(
                f"export: {len(missing)} quantizer(s) never calibrated ({', '.join(missing[:3])}{more}); "
                "run a ptq stage (or compress.ptq.calibrate) first"
            )
        wide = sorted({q.spec.num_bits for _, q in quant.quantizers(model)} - {8})
        if wide:
            raise CompressError(f"export: ONNX QuantizeLinear carries 8-bit integers; the model has {wide}-bit quantizers")
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval().cpu()
    source = quant.fold_batchnorm(model) if quantized else model
    example_input = _in_signature_order(source, move_inputs(example_input, "cpu"))
    output_names = _output_names(source, example_input)
    axes = {**_input_axes(example_input), **{n: {0: "batch"} for n in output_names}} if dynamic_batch else None
    try:
        with io.atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but is what gives opset 13
            try:  # attention as MatMul/Softmax at any opset; the exporter's prints kept off the terminal
                with explicit_attention(), captured_fds() as printed:
                    torch.onnx.export(
                        source,
                        export_args(example_input),
                        str(tmp),
                        opset_version=opset,
                        dynamo=False,
                        input_names=input_names(example_input),
                        output_names=output_names,
                        dynamic_axes=axes,
                        do_constant_folding=True,
                    )
            except Exception as exc:  # tracer/exporter failures come as many types
                raise export_error(exc, printed) from None
            proto = onnx.load(str(tmp))
            biases = 0
            if quantized:
                qdq.fold_weight_quantizers(proto)
                if wanted is Target.onnxruntime:
                    biases = qdq.quantize_biases(proto)
                onnx.save(proto, str(tmp))
            try:
                onnx.checker.check_model(proto, full_check=True)
            except onnx.checker.ValidationError as exc:
                raise CompressError(f"exported ONNX fails onnx.checker: {first_line(exc)}") from None
    finally:
        model.to(device).train(was_training)
    opsets = {o.domain: o.version for o in proto.opset_import}
    return OnnxInfo(
        path,
        opsets.get("", opsets.get("ai.onnx", opset)),
        len(proto.graph.node),
        count_qdq_pairs(proto),
        target=wanted.value if wanted is not None else None,
        int8_weights=qdq.count_int8_weights(proto) if quantized else 0,
        int32_biases=biases,
        rules=check_tensorrt(proto) if quantized and wanted is Target.tensorrt else None,
    )
