"""The run directory is compress's alone: a marker says so, a lock keeps a second run out, and
``--overwrite`` removes only what earlier runs wrote, never through a link, never a user's file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_errors import one_line_error
from helpers_recipes import stage_recipe

from compress import pipeline
from compress.errors import CompressError
from compress.recipe import load_recipe
from compress.rundir import MARKER
from compress.runlock import LOCK_NAME, RunLock, holder_pid

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
NO_STAGES = "name: empty\nmodel: {factory: 'compress.zoo:digits_mlp', kwargs: {hidden: 8}}\n" \
            "data: {eval: {source: digits, split: test}}\nstages: []\n"


def _listed(run_dir: Path) -> set[str]:
    return set(json.loads((run_dir / MARKER).read_text())["files"])


def _files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()}


def _user_files(root: Path) -> dict[str, str]:
    files = {"model.pt": "my own model", "report.json": "{}", "stages/01-train/checkpoint.pt": "my weights",
             "notes/todo.txt": "keep me"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return files


# --------------------------------------------------------------------------------------------
# The marker: only folders compress made are resumed or overwritten


def test_a_folder_that_is_not_a_run_is_refused_and_untouched(cli, tmp_path, write_recipe, tiny_recipe_text,
                                                             snapshot_tree) -> None:
    out = tmp_path / "mine"
    _user_files(out)
    before = snapshot_tree(out)
    recipe = write_recipe(tiny_recipe_text)
    for flags in ([], ["--resume"], ["--overwrite"]):
        message = cli("run", recipe, "--out", out, "--quiet", *flags).error_line()
        assert message == (f"{out}: is not a compress run directory (no {MARKER}) and is not empty; nothing was "
                           "touched; name a new or empty folder with --out"), flags
        assert snapshot_tree(out) == before
        assert sorted(p.name for p in out.iterdir()) == ["model.pt", "notes", "report.json", "stages"]  # no lock left


def test_an_empty_folder_is_used_and_the_marker_lists_every_file_written(cli, tmp_path, write_recipe,
                                                                        mlp_checkpoint) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    stages = ("  - train: {finetune: {epochs: 1, lr: 0.05}}\n  - export:\n      onnx: {target: onnxruntime}\n"
              "      engine: {batch_sizes: [1], bench_iters: 1}\n      triton: {name: mlp}\n")
    recipe = stage_recipe(write_recipe, mlp_checkpoint, stages, target=None)
    assert cli("run", recipe, "--out", out, "--quiet").code == 0
    written = _files(out) - {MARKER}
    assert {"recipe.yaml", "model.pt", "model.onnx", "engine.onnx", "report.json", "report.md",
            "stages/01-train/checkpoint.pt", "stages/02-export/metrics.json", "triton/mlp/1/model.onnx",
            "triton/mlp/config.pbtxt"} <= written
    assert _listed(out) == written  # every file, triton's and the export's included; nothing else
    assert not (out / LOCK_NAME).exists()  # the lock goes with the run


def test_a_run_by_an_older_compress_is_refused_with_the_fix(cli, finished_run, snapshot_tree) -> None:
    (finished_run.run_dir / MARKER).unlink()  # what compress 0.1.0 left: recipe.yaml, no marker
    before = snapshot_tree(finished_run.run_dir)
    for flags in ([], ["--resume"], ["--overwrite"]):
        message = cli("run", finished_run.recipe, "--out", finished_run.run_dir, "--quiet", *flags).error_line()
        assert f"has a recipe.yaml but no {MARKER} marker" in message
        assert "nothing was touched; run into a new --out (or delete the folder yourself)" in message
        assert snapshot_tree(finished_run.run_dir) == before


def test_a_damaged_marker_is_refused(cli, finished_run, snapshot_tree) -> None:
    marker = finished_run.run_dir / MARKER
    marker.write_text(json.dumps({"tool": "compress", "format": 1, "files": ["../outside.txt"]}))
    before = snapshot_tree(finished_run.run_dir)
    message = cli("run", finished_run.recipe, "--out", finished_run.run_dir, "--quiet", "--overwrite").error_line()
    assert message.startswith(f"{marker}: 'files' must list paths inside the folder")
    assert snapshot_tree(finished_run.run_dir) == before


# --------------------------------------------------------------------------------------------
# --overwrite removes only the files earlier runs wrote


def test_overwrite_keeps_the_users_files_and_removes_the_old_runs(cli, finished_run, write_recipe) -> None:
    run_dir = finished_run.run_dir
    (run_dir / "my-notes.txt").write_text("mine")
    (run_dir / "stages" / "01-train" / "plot.png").write_bytes(b"my plot")
    old = _listed(run_dir)
    assert {"stages/01-train/checkpoint.pt", "model.pt", "report.json"} <= old
    recipe = write_recipe(NO_STAGES, "empty.yaml")  # writes no stages/: the old run's stage files must go
    assert cli("run", recipe, "--out", run_dir, "--quiet", "--overwrite").code == 0
    assert (run_dir / "my-notes.txt").read_text() == "mine"
    assert (run_dir / "stages" / "01-train" / "plot.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in (run_dir / "stages" / "01-train").iterdir()) == ["plot.png"]  # the run's files gone
    assert _listed(run_dir) == {"recipe.yaml", "model.pt", "report.json", "report.md", "report_tradeoff.png"}
    assert "my-notes.txt" not in _listed(run_dir)


def test_overwrite_prunes_the_folders_it_emptied(cli, finished_run, write_recipe) -> None:
    recipe = write_recipe(NO_STAGES, "empty.yaml")
    assert cli("run", recipe, "--out", finished_run.run_dir, "--quiet", "--overwrite").code == 0
    assert not (finished_run.run_dir / "stages").exists()


def test_overwrite_never_follows_a_stages_link(cli, finished_run, tmp_path, snapshot_tree) -> None:
    run_dir = finished_run.run_dir
    elsewhere = tmp_path / "elsewhere"
    (run_dir / "stages").rename(elsewhere)  # the user's real files now live outside the run directory
    (run_dir / "stages").symlink_to(elsewhere)
    before, outside = snapshot_tree(run_dir), snapshot_tree(elsewhere)
    for flags in (["--overwrite"], ["--resume"]):
        message = cli("run", finished_run.recipe, "--out", run_dir, "--quiet", *flags).error_line()
        assert message.startswith(f"{run_dir / 'stages'}: is a symbolic link; compress never reads, writes or deletes "
                                  "through a link in its run directory, and touched nothing")
        assert snapshot_tree(elsewhere) == outside and snapshot_tree(run_dir) == before
    assert (run_dir / "model.pt").exists() and (run_dir / "report.json").exists()


def test_overwrite_removes_a_linked_file_but_not_its_target(cli, finished_run, tmp_path) -> None:
    run_dir = finished_run.run_dir
    target = tmp_path / "precious.pt"
    target.write_bytes(b"the user's only copy")
    (run_dir / "model.pt").unlink()
    (run_dir / "model.pt").symlink_to(target)
    assert cli("run", finished_run.recipe, "--out", run_dir, "--quiet", "--overwrite").code == 0
    assert target.read_bytes() == b"the user's only copy"
    assert not (run_dir / "model.pt").is_symlink() and (run_dir / "model.pt").stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# The lock: one run at a time; a killed run never blocks the next


_HOLD = """
import sys, time
from pathlib import Path
from compress.runlock import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(300)
"""


def _wait_for_lock(proc: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while holder_pid(run_dir) != proc.pid:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)


def test_a_second_run_on_a_running_folder_exits_2_naming_the_holder(cli, tmp_path, write_recipe,
                                                                   tiny_recipe_text) -> None:
    recipe = write_recipe(tiny_recipe_text.replace("epochs: 1,", "epochs: 100000,"))  # runs until killed
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "compress", "run", str(recipe), "--out", str(out), "--quiet"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(first, out)
        for flags in ([], ["--resume"], ["--overwrite"]):
            message = cli("run", recipe, "--out", out, "--quiet", *flags).error_line()
            assert message == (f"{out}: another compress run (process {first.pid}) is using this run directory; "
                               "wait for it to finish or use another --out"), flags
        assert first.poll() is None  # the refused runs did not disturb the first
    finally:
        first.kill()
        first.wait()
        first.stderr.close()


def test_a_killed_holder_does_not_block_resume(cli, finished_run) -> None:
    run_dir = finished_run.run_dir
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        result = cli("run", finished_run.recipe, "--out", run_dir, "--quiet", "--resume")
        assert f"(process {holder.pid}) is using this run directory" in result.error_line()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    assert holder_pid(run_dir) == holder.pid  # the dead run's lock file is still there ...
    assert cli("run", finished_run.recipe, "--out", run_dir, "--quiet", "--resume").code == 0  # ... and blocks nothing
    assert not (run_dir / LOCK_NAME).exists()


def test_a_folder_holding_only_a_dead_runs_lock_file_counts_as_empty(cli, tmp_path, write_recipe,
                                                                      tiny_recipe_text) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999\n")  # a run killed before it wrote anything
    assert cli("run", write_recipe(tiny_recipe_text), "--out", out, "--quiet").code == 0
    assert _listed(out) == _files(out) - {MARKER} and not (out / LOCK_NAME).exists()


def test_resume_lists_the_new_files_and_never_the_users(cli, finished_run) -> None:
    run_dir = finished_run.run_dir
    (run_dir / "my-notes.txt").write_text("mine")
    (run_dir / "model.pt").unlink()
    assert cli("run", finished_run.recipe, "--out", run_dir, "--quiet", "--resume").code == 0
    assert "model.pt" in _listed(run_dir) and "my-notes.txt" not in _listed(run_dir)
    assert _listed(run_dir) == _files(run_dir) - {MARKER, "my-notes.txt"}


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path, write_recipe, tiny_recipe_text) -> None:
    recipe = load_recipe(write_recipe(tiny_recipe_text))
    out = tmp_path / "run"
    seen: list[str] = []

    def log(line: str) -> None:  # called mid-run: the lock must be ours then
        if holder_pid(out) == os.getpid():
            seen.append(one_line_error(CompressError, RunLock.acquire, out))

    pipeline.run(recipe, out, progress=False, log=log)
    assert seen and all(f"(process {os.getpid()})" in msg for msg in seen)
    assert not (out / LOCK_NAME).exists()
    RunLock.acquire(out).release()  # free again


# --------------------------------------------------------------------------------------------
# Output paths that cannot be written: one line, exit 2, before any work


def test_out_or_report_inside_a_regular_file_is_one_line(cli, tmp_path, write_recipe, tiny_recipe_text,
                                                        mlp_checkpoint) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    recipe = write_recipe(tiny_recipe_text)
    message = cli("run", recipe, "--out", blocker / "run", "--quiet").error_line()
    assert message == f"{blocker / 'run'}: {blocker} is not a folder; name a new or empty folder for the run"
    message = cli("run", recipe, "--out", blocker, "--quiet").error_line()
    assert message == f"{blocker}: is a file, not a folder; name a new or empty folder for the run"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")  # was "is a file, not a folder"
    message = cli("run", recipe, "--out", dangling, "--quiet").error_line()
    assert message == f"{dangling}: is a link to a missing folder; name a new or empty folder for the run"
    message = cli("check", mlp_checkpoint, "--reference", mlp_checkpoint, "--data", "digits:test",
                  "--report", blocker / "report.json").error_line()
    assert message == f"--report {blocker / 'report.json'}: cannot be written ({blocker} is not a folder)"
    message = cli("bench", mlp_checkpoint, "--input-shape", "1,8,8", "--report", blocker / "b.json").error_line()
    assert message == f"--report {blocker / 'b.json'}: cannot be written ({blocker} is not a folder)"
    assert blocker.read_text() == "a file, not a folder"


def test_read_only_out_or_report_is_one_line(cli, tmp_path, write_recipe, tiny_recipe_text, mlp_checkpoint) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root (CAP_DAC_OVERRIDE) ignores modes
            pytest.skip("file modes are not enforced for this user; the regular-file test covers it")
        recipe = write_recipe(tiny_recipe_text)
        message = cli("run", recipe, "--out", locked / "run", "--quiet").error_line()
        assert message == f"{locked / 'run'}: cannot create the run directory (Permission denied)"
        message = cli("run", recipe, "--out", locked, "--quiet").error_line()  # empty, but not writable
        assert message == f"{locked}: cannot write the run directory (Permission denied)"
        message = cli("check", mlp_checkpoint, "--reference", mlp_checkpoint, "--data", "digits:test",
                      "--report", locked / "report.json").error_line()
        assert message == f"--report {locked / 'report.json'}: cannot be written (the folder {locked} is not writable)"
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------------------------
# Under torchrun: rank 0 locks and marks, every rank follows its decision (no rank hangs)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "compress", *args], env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_marks_locks_and_resumes(tmp_path, write_recipe, tiny_recipe_text) -> None:
    recipe, out = str(write_recipe(tiny_recipe_text)), tmp_path / "run"
    first = _torchrun("run", recipe, "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _listed(out) == _files(out) - {MARKER} and "stages/01-train/checkpoint.pt" in _listed(out)
    assert not (out / LOCK_NAME).exists()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        refused = _torchrun("run", recipe, "--out", str(out), "--quiet", "--resume")
        assert refused.returncode != 0  # both ranks stopped (each says the same line), neither hung
        assert f"compress: error: {out}: another compress run (process {holder.pid})" in refused.stderr
        assert refused.stderr.count("compress: error: ") == 2  # torchrun adds its own report of the exit codes
        assert "compress/pipeline.py" not in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    resumed = _torchrun("run", recipe, "--out", str(out), "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / LOCK_NAME).exists()


def test_resume_never_reads_a_stage_through_a_link_or_a_hand_edited_record(cli, finished_run, tmp_path,
                                                                           mlp_checkpoint) -> None:
    """A stage whose files are links (or a FIFO) or whose metrics.json names another checkpoint or is not a
    record is not taken as finished: it runs again (each was read through, hung, or gave a traceback)."""
    run_dir = finished_run.run_dir
    stage = run_dir / "stages" / "01-train"
    foreign = tmp_path / "foreign.pt"  # another model (hidden 8 vs the recipe's own): never loaded
    foreign.write_bytes(mlp_checkpoint.read_bytes())
    record = json.loads((stage / "metrics.json").read_text())

    def link_checkpoint() -> None:
        (stage / "checkpoint.pt").unlink()
        (stage / "checkpoint.pt").symlink_to(foreign)

    damages = {
        "linked checkpoint": link_checkpoint,
        "record names another checkpoint": lambda: (stage / "metrics.json").write_text(
            json.dumps({**record, "checkpoint": str(foreign)})),
        "record is a list": lambda: (stage / "metrics.json").write_text("[1]"),
        "record is not UTF-8": lambda: (stage / "metrics.json").write_bytes(b"\xff\xfe"),
        "record is a FIFO": lambda: ((stage / "metrics.json").unlink(), os.mkfifo(stage / "metrics.json")),
    }
    for name, damage in damages.items():
        damage()
        result = cli("run", finished_run.recipe, "--out", run_dir, "--resume")
        assert result.code == 0, (name, result.err)
        assert "resume: 1 finished stage" not in result.err, name  # the stage ran again
        assert not (stage / "checkpoint.pt").is_symlink() and (stage / "metrics.json").is_file(), name
        assert json.loads((run_dir / "report.json").read_text())["stages"][0]["checkpoint"] == \
            "stages/01-train/checkpoint.pt", name
    assert foreign.read_bytes() == mlp_checkpoint.read_bytes()


def test_resume_refuses_a_recipe_yaml_that_is_a_fifo_a_link_or_not_utf8(cli, finished_run, tmp_path) -> None:
    run_dir, saved = finished_run.run_dir, finished_run.run_dir / "recipe.yaml"
    target = tmp_path / "theirs.yaml"
    target.write_text(saved.read_text())
    for name, make in (("fifo", lambda: os.mkfifo(saved)), ("link", lambda: saved.symlink_to(target)),
                       ("bytes", lambda: saved.write_bytes(b"\xff\xfe"))):
        saved.unlink()
        make()
        message = cli("run", finished_run.recipe, "--out", run_dir, "--quiet", "--resume").error_line()
        assert message.startswith(f"--resume: {saved} is not "), (name, message)


def test_a_stages_link_made_while_the_inputs_are_checked_is_still_refused(finished_run, tmp_path, snapshot_tree) -> None:
    """The links are checked when the run is claimed and again just before --overwrite removes anything: a
    link swapped in while the model and data were being checked (seconds) made the removal go through it."""
    from compress import rundir

    run_dir = finished_run.run_dir
    recipe = load_recipe(finished_run.recipe)
    held, decision = rundir.claim(recipe, run_dir, resume=False, overwrite=True)
    try:
        elsewhere = tmp_path / "elsewhere"
        (run_dir / "stages").rename(elsewhere)
        (run_dir / "stages").symlink_to(elsewhere)
        outside = snapshot_tree(elsewhere)
        message = one_line_error(CompressError, rundir.start, recipe, run_dir, decision, overwrite=True)
        assert message.startswith(f"{run_dir / 'stages'}: is a symbolic link"), message
    finally:
        held.release()
    assert snapshot_tree(elsewhere) == outside and (run_dir / "model.pt").exists()


def test_a_lock_path_that_is_a_link_folder_or_fifo_is_named_and_nothing_is_touched(cli, finished_run, tmp_path,
                                                                                   snapshot_tree) -> None:
    """Was "cannot write the run directory (Too many levels of symbolic links)" or "(Invalid argument)"."""
    run_dir, lock = finished_run.run_dir, finished_run.run_dir / LOCK_NAME
    target = tmp_path / "theirs.txt"
    target.write_text("keep")
    for make in (lambda: lock.symlink_to(target), lambda: lock.symlink_to(tmp_path / "missing"), lock.mkdir,
                 lambda: os.mkfifo(lock)):
        make()
        before = snapshot_tree(run_dir)
        message = cli("run", finished_run.recipe, "--out", run_dir, "--quiet", "--overwrite").error_line()
        assert message == f"{lock}: is not compress's lock file (a link, folder, FIFO or device); nothing was " \
                          "touched; remove it"
        assert snapshot_tree(run_dir) == before and target.read_text() == "keep"
        assert not (tmp_path / "missing").exists()
        lock.rmdir() if lock.is_dir() and not lock.is_symlink() else lock.unlink()


def test_overwrite_refuses_to_delete_a_checkpoint_the_recipe_reads(cli, finished_run, write_recipe,
                                                                   snapshot_tree) -> None:
    """Distilling from the old run's stage into the same --out --overwrite deleted the whole old run, teacher
    included, then failed with "file not found"; the model checkpoint is refused too (its file would change)."""
    run_dir = finished_run.run_dir
    before = snapshot_tree(run_dir)
    teacher = run_dir / "stages" / "01-train" / "checkpoint.pt"
    recipe = write_recipe(f"""\
        name: dist
        model: {{factory: 'compress.zoo:digits_mlp', kwargs: {{hidden: 8}}}}
        data: {{train: {{source: digits, split: train, limit: 128}}, eval: {{source: digits, split: test}}}}
        stages:
          - distill:
              teacher: {{checkpoint: {teacher}}}
              finetune: {{epochs: 1}}
        """, name="dist.yaml")
    message = cli("run", recipe, "--out", run_dir, "--quiet", "--overwrite").error_line()
    assert message == (f"{recipe}:6 stages.0.distill.teacher.checkpoint: --overwrite would delete {teacher}, which "
                       "this recipe reads; copy it out of the run directory first, or run into another --out")
    own = write_recipe(finished_run.recipe.read_text().replace("kwargs: {hidden: 8}",
                                                               f"kwargs: {{hidden: 8}}\n  checkpoint: {run_dir}/model.pt"),
                       name="own.yaml")
    assert "model.checkpoint: --overwrite would delete" in cli("run", own, "--out", run_dir, "--quiet",
                                                               "--overwrite").error_line()
    assert snapshot_tree(run_dir) == before
