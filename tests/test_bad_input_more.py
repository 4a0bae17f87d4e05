"""Bad input found after the recipe parses: still one line and exit 2, never a traceback."""

from pathlib import Path

import numpy as np
import torch

import compress
from compress.data import build_loader
from compress.recipe import DigitsData
from compress.train import FinetuneConfig, finetune


def _recipe(tmp_path: Path, model: str, eval_spec: str = "{source: digits, split: test}", metric: str = "top1") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
name: more
model: {model}
data:
  train: {{source: digits, split: train, limit: 128}}
  eval: {eval_spec}
metric: "{metric}"
stages:
  - train: {{finetune: {{epochs: 1}}}}
""")
    return path


def test_model_forward_type_error_is_bad_input(cli, tmp_path):
    recipe = _recipe(tmp_path, "{factory: 'helpers_models:two_inputs'}")
    message = cli("run", recipe, "--out", tmp_path / "out", "--quiet").error_line()
    assert message.startswith(f"{recipe}:5 data.eval: model helpers_models:two_inputs cannot run on inputs of shape")
    assert "TypeError" in message and "mask" in message
    assert not (tmp_path / "out").exists()


def test_labels_beyond_the_models_classes(cli, tmp_path):
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((20, 1, 8, 8), np.float32), y=np.arange(20))  # labels 0..19, model has 10 outputs
    recipe = _recipe(tmp_path, "{factory: compress.zoo:digits_mlp}", f"{{source: npz, path: {npz}}}")
    message = cli("validate", recipe).error_line()
    assert message == f"{recipe}:5 data.eval: labels range over 0..19 but the model outputs 10 classes"


def test_finetune_labels_beyond_the_models_classes_is_data_error():
    x, y = torch.zeros(16, 1, 8, 8), torch.full((16,), 12)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = compress.build("compress.zoo:digits_mlp")
    try:
        finetune(model, loader, FinetuneConfig(epochs=1), progress=False)
    except compress.DataError as exc:
        assert str(exc) == "finetune: labels range over 12..12 but the model outputs 10 classes"
    else:
        raise AssertionError("out-of-range labels were accepted")


def test_failing_custom_metric_is_bad_input(cli, tmp_path):
    recipe = _recipe(tmp_path, "{factory: compress.zoo:digits_mlp}", metric="helpers_models:failing_metric")
    message = cli("validate", recipe).error_line()
    assert message == f"{recipe}:6 metric: metric 'helpers_models:failing_metric' failed: ZeroDivisionError: no samples"


def test_check_unknown_metric_and_wrong_shape_data(cli, tmp_path, mlp_checkpoint):
    message = cli("check", mlp_checkpoint, "--reference", mlp_checkpoint, "--data", "digits:test",
                  "--metric", "top5", "--report", tmp_path / "r.json").error_line()
    assert message == "--metric: unknown metric 'top5' (top1, pixel_accuracy, miou, agreement, cosine, or module:callable)"
    npz = tmp_path / "rgb.npz"
    np.savez(npz, x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    message = cli("check", mlp_checkpoint, "--reference", mlp_checkpoint, "--data", f"npz:{npz}",
                  "--report", tmp_path / "r.json").error_line()
    assert message.startswith(f"{mlp_checkpoint} cannot run on inputs of shape [4, 3, 8, 8]: ")
    assert not (tmp_path / "r.json").exists()


def test_resume_and_overwrite_are_exclusive(cli, tmp_path):
    recipe = _recipe(tmp_path, "{factory: compress.zoo:digits_mlp}")
    message = cli("run", recipe, "--resume", "--overwrite").error_line()
    assert "not allowed with argument" in message


def test_check_leaves_the_callers_model_alone():
    model = compress.build("compress.zoo:digits_mlp").train()
    loader = build_loader(DigitsData(source="digits", split="test", limit=32), "eval")
    result = compress.check(model, model, loader, max_drop=0.0)
    assert result.passed and result.agreement == 1.0
    assert model.training  # still in train mode, as the caller left it


def test_finetune_leaves_the_global_rng_alone():
    loader = build_loader(DigitsData(source="digits", split="train", limit=64), "train", train=True)
    model = compress.build("compress.zoo:digits_mlp")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(model, loader, FinetuneConfig(epochs=1, seed=7), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_check_and_bench_name_an_unknown_model_kind_alike(cli, tmp_path, mlp_checkpoint):
    model = tmp_path / "model.txt"
    model.write_text("not a model")
    expected = f"{model}: unknown model kind '.txt' (expected .onnx, .plan, .engine, .pt or .pth)"
    assert cli("check", model, "--reference", mlp_checkpoint, "--data", "digits:test",
               "--report", tmp_path / "r.json").error_line() == expected
    assert cli("bench", model, "--input-shape", "1,8,8").error_line() == expected
