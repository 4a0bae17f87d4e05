"""Export: ONNX files, engines, and checks of an engine against its source model.

``compress.export.onnx(model, example_input, path)`` is the public verb; the implementation lives
in the ``compress.export.onnx`` module (import it with ``from compress.export.onnx import ...``).
"""

from compress.export.check import CheckResult, check
from compress.export.onnx import OnnxInfo, export_onnx
from compress.export.onnxruntime import OrtEngine, build_engine

onnx = export_onnx

__all__ = ["CheckResult", "OnnxInfo", "OrtEngine", "build_engine", "check", "export_onnx", "onnx"]
