"""The engine options: one options type per backend, chosen by ``backend`` (a discriminated union)."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from compress.export.options import (
    BACKEND_NAMES,
    BACKENDS,
    EngineOptions,
    OnnxRuntimeEngine,
    TensorRTEngine,
)
from compress.export.stage import ExportConfig

ENGINE = TypeAdapter(EngineOptions)


def test_each_backend_declares_only_its_own_options():
    assert BACKENDS == (OnnxRuntimeEngine, TensorRTEngine) and BACKEND_NAMES == ("onnxruntime", "tensorrt")
    shared = ["backend", "precision", "keep_fp32", "batch_sizes", "bench_iters"]
    assert list(OnnxRuntimeEngine.model_fields) == [*shared, "threads", "optimization"]
    assert list(TensorRTEngine.model_fields) == [*shared, "profile", "workspace_mb", "timing_cache"]


def test_backend_left_out_is_onnxruntime_and_engine_null_stays_null():
    assert isinstance(ExportConfig().engine, OnnxRuntimeEngine)  # no engine key
    assert isinstance(ExportConfig.model_validate({"engine": {}}).engine, OnnxRuntimeEngine)
    assert ExportConfig.model_validate({"engine": None}).engine is None
    trt = ENGINE.validate_python({"backend": "tensorrt", "workspace_mb": 512})
    assert isinstance(trt, TensorRTEngine) and trt.workspace_mb == 512
    # the resolved recipe lists the chosen backend's options only
    assert list(ExportConfig().model_dump(mode="json")["engine"]) == list(OnnxRuntimeEngine.model_fields)


@pytest.mark.parametrize(("engine", "key", "owner", "backend"), [
    ({"workspace_mb": 512}, "workspace_mb", "tensorrt", "onnxruntime"),
    ({"backend": "onnxruntime", "profile": {"min": 2}}, "profile", "tensorrt", "onnxruntime"),
    ({"backend": "tensorrt", "threads": 2}, "threads", "onnxruntime", "tensorrt"),
    ({"backend": "tensorrt", "optimization": "basic"}, "optimization", "onnxruntime", "tensorrt"),
])
def test_another_backends_option_names_its_backend(engine, key, owner, backend):
    with pytest.raises(ValidationError) as info:
        ENGINE.validate_python(engine)
    (err,) = info.value.errors()
    assert err["ctx"]["key"] == key and err["msg"] == f"applies to backend {owner}, not {backend}"


def test_validate_names_file_line_option_and_backend(cli, write_recipe, tiny_recipe_text):
    recipe = write_recipe(tiny_recipe_text + "  - export:\n      onnx: {target: onnxruntime}\n"
                          "      engine:\n        backend: tensorrt\n        threads: 4\n")
    line = cli("validate", recipe, "--quiet").error_line()
    assert line == f"{recipe}:15 stages.1.export.engine.threads: applies to backend onnxruntime, not tensorrt"
    typo = write_recipe(tiny_recipe_text + "  - export: {engine: {backend: tensorrtt}}\n")
    line = cli("validate", typo, "--quiet").error_line()
    assert line == (f"{typo}:11 stages.1.export.engine: unknown backend 'tensorrtt'; did you mean 'tensorrt'? "
                    "(onnxruntime, tensorrt)")
    result = cli("validate", write_recipe(tiny_recipe_text + "  - export: {engine: {}}\n"), "--quiet",
                 "--set", "stages.1.export.engine.workspace_mb=64")
    assert result.code == 2
    assert result.error_line() == ("--set stages.1.export.engine.workspace_mb: applies to backend tensorrt, "
                                   "not onnxruntime")
