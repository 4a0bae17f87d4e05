"""A run killed during a later stage resumes to the same report; files are never half-written."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress import io, pipeline
from compress.models import read_checkpoint
from compress.recipe import load_recipe

RECIPE = """\
name: resume-test
model: {factory: compress.zoo:digits_cnn, kwargs: {width: 8}}
data:
  train: {source: digits, split: train, batch_size: 64}
  eval:  {source: digits, split: test, batch_size: 256}
stages:
  - train: {finetune: {epochs: 3, lr: 0.05}}
  - train: {finetune: {epochs: 40, lr: 0.01}}
  - export: {engine: {batch_sizes: [1], bench_iters: 2}, check: {max_drop: 0.1}}
"""

ROOT = Path(__file__).parents[1]


def _numbers(report: dict) -> dict:
    """Everything in a report that must not depend on timing."""
    return {
        "baseline": report["baseline"],
        "stages": [{k: v for k, v in s.items() if k != "seconds"} for s in report["stages"]],
        "export": report["export"],
        "engine_metrics": report["engine"]["metrics"],
        "check": report["check"],
    }


@pytest.mark.slow
def test_kill_during_later_stage_then_resume_gives_same_report(tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(RECIPE)
    recipe = load_recipe(recipe_path)
    full = pipeline.run(recipe, tmp_path / "full", progress=False, log=None)

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "compress", "run", str(recipe_path), "--out", str(run_dir), "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    first_done = run_dir / "stages" / "01-train" / "metrics.json"
    deadline = time.monotonic() + 240
    while not first_done.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "stage 1 never finished"
        time.sleep(0.02)
    time.sleep(0.3)  # well inside stage 2's 40 epochs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (run_dir / "stages" / "02-train" / "metrics.json").exists(), "killed too late to test resume"
    assert not (run_dir / "report.json").exists()
    # the finished stage's checkpoint is whole and identical to the uninterrupted run's
    killed_ckpt = read_checkpoint(run_dir / "stages" / "01-train" / "checkpoint.pt")
    full_ckpt = read_checkpoint(tmp_path / "full" / "stages" / "01-train" / "checkpoint.pt")
    for key, value in full_ckpt["state_dict"].items():
        torch.testing.assert_close(killed_ckpt["state_dict"][key], value, rtol=0, atol=0)

    resumed = pipeline.run(recipe, run_dir, resume=True, progress=False, log=None)
    assert resumed.exit_code == full.exit_code == 0
    assert _numbers(resumed.report) == _numbers(full.report)
    assert resumed.report["stages"][0]["seconds"] == pytest.approx(
        __import__("json").loads(first_done.read_text())["seconds"]
    ), "stage 1 was re-run instead of reused"
    assert not list(run_dir.rglob(".*.tmp"))


def test_resume_refuses_a_changed_recipe(tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(RECIPE.replace("epochs: 40", "epochs: 1").replace("epochs: 3,", "epochs: 1,"))
    pipeline.run(load_recipe(recipe_path), tmp_path / "run", progress=False, log=None)
    changed = load_recipe(recipe_path, ["stages.1.train.finetune.lr=0.02"])
    with pytest.raises(Exception, match=r"different recipe \(stages\.1\.train\.finetune\.lr: 0\.01 then, 0\.02 now\)"):
        pipeline.run(changed, tmp_path / "run", resume=True, progress=False, log=None)


_CRASH = """
import os, sys, torch
from compress import io
def torn_save(obj, f):
    fh = f if hasattr(f, "write") else open(f, "wb")  # compress saves through a file object
    fh.write(b"PK\\x03\\x04 half a checkpoint")
    fh.flush()
    os._exit(9)  # killed mid-write: no cleanup code runs
torch.save = torn_save
io.torch_save({"x": torch.zeros(3)}, sys.argv[1])
"""


def test_process_killed_mid_write_leaves_previous_file_whole(tmp_path):
    target = tmp_path / "checkpoint.pt"
    io.torch_save({"x": torch.arange(4)}, target)
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(target)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 9
    assert target.read_bytes() == before
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.arange(4))


def test_exception_mid_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "report.json"
    io.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), io.atomic_open(target) as fh:
        fh.write('{"a": 2')
        raise RuntimeError("disk full")
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_files_get_normal_permissions(tmp_path):
    target = tmp_path / "metrics.json"
    io.write_json(target, {})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    os.chmod(target, 0o640)
    io.write_json(target, {"b": 2})  # replacing a file keeps its mode
    assert target.stat().st_mode & 0o777 == 0o640
