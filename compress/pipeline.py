"""Runs a recipe's stages and owns the run directory, resume, and the report.

Run directory (DESIGN.md)::

    DIR/recipe.yaml                  the resolved recipe
    DIR/stages/NN-TYPE/checkpoint.pt compress checkpoint (stages that change the model)
    DIR/stages/NN-TYPE/metrics.json  written last: its presence marks the stage finished
    DIR/model.pt                     the final model;  DIR/model.onnx, DIR/engine.onnx from export
    DIR/report.json, DIR/report.md   (+ report_tradeoff.png)
    DIR/.compress-run.json           the marker: compress made DIR; the files its runs wrote (rundir.py)
    DIR/.compress-run.lock           exists while a run holds DIR (runlock.py)

Every file is written atomically, so a killed run leaves only whole files; ``--resume`` continues
after the last stage whose metrics.json exists, and refuses if the recipe changed. Only a marked
folder is resumed or overwritten, and ``--overwrite`` removes only the files the marker lists.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import io, metrics, models, report, rundir, structure
from compress.data import check_class_labels, example_input, split_batch
from compress.errors import CompressError, DataError, located
from compress.inputs import move_inputs, signature
from compress.outputs import require_task
from compress.profile import size_stats
from compress.ptq.sensitivity import Sensitivity
from compress.ptq.sensitivity import sensitivity as measure_sensitivity
from compress.quant import is_quantized
from compress.recipe import Recipe, StageSpec
from compress.stages.context import Splits, StageContext, recipe_factories
from compress.stages.finetune import check_finetune
from compress.stages.quantize import QuantOptions, quantize
from compress.stages.registry import Effect, stage_types
from compress.train import FinetuneConfig, barrier, broadcast_object, init_distributed, is_main_process, pick_device

Log = Callable[[str], None]


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """The recipe's model, data and baseline figures, ready for the stages."""

    recipe: Recipe
    model: nn.Module
    splits: Splits
    device: torch.device
    example: torch.Tensor
    baseline_outputs: metrics.Outputs
    baseline: dict[str, Any]
    baseline_model: nn.Module  # the input model as loaded, frozen: `teacher: baseline`, check.reference
    progress: bool = True
    notes: dict[int, str] = field(default_factory=dict)  # stage index -> what its dry run found (validate prints it)


def prepare(recipe: Recipe, *, progress: bool = True) -> Prepared:
    """Build model and data, check they fit together and every stage's options resolve, score the baseline.

    Library warnings raised meanwhile (torch on a zero-size layer, say) are shown only when the
    inputs pass: a bad input is reported as its one line, not after a screen of warnings.

    Raises:
        CompressError: anything wrong with the model, checkpoint, data or a stage's options.
    """
    with warnings.catch_warnings(record=True) as caught:
        prep = _prepare(recipe, progress)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    return prep


def _prepare(recipe: Recipe, progress: bool) -> Prepared:
    body = recipe.body
    device = pick_device(body.device)
    torch.manual_seed(body.seed)
    key = "checkpoint" if body.model.checkpoint is not None else "factory"
    with located(recipe.locate("model", key), recipe.source):
        model = models.load_model(body.model.checkpoint, body.model.factory, body.model.kwargs, trust=body.model.trust)
    model.to(device).eval()
    splits = Splits(body.data, seed=body.seed, where=lambda split: recipe.locate("data", split))
    eval_loader = splits.loader("eval")
    example = example_input(eval_loader)
    shape = signature(example)
    for split in ("train", "val", "calibration"):
        if splits.has(split):  # build now: fail before an hour of training, not after
            other = signature(example_input(splits.loader(split)))
            if other != shape:
                raise CompressError(f"{recipe.locate('data', split)}: inputs have shape {other} but data.eval has {shape}")
    if splits.has("val") and body.metric.name in metrics.TASK and split_batch(next(iter(splits.loader("val"))))[1] is None:
        raise DataError(f"{recipe.locate('data', 'val')}: metric {body.metric.name} selects on labels, but data.val has none")
    # the train loop's cross-entropy and top1 take class indices
    for split in ("train", *(("val", "eval") if body.metric.name in metrics.TASK else ())):
        if splits.has(split):
            check_class_labels(splits.loader(split), recipe.locate("data", split))
    if body.model.input_shape is not None and shape != body.model.input_shape:
        raise CompressError(f"{recipe.locate('model', 'input_shape')}: is {body.model.input_shape} but data.eval inputs have {shape}")
    where_eval = recipe.locate("data", "eval")
    outputs = metrics.collect(model, eval_loader, name=f"{where_eval}: model {body.model.factory or body.model.checkpoint}")
    _task_output(recipe, outputs)
    metrics.check_labels(outputs.logits, outputs.labels, where_eval)
    with located(recipe.locate("metric"), recipe.source):
        scores = metrics.score(body.metric.name, outputs)
    baseline = {"metrics": scores, **size_stats(model, move_inputs(example, device))}
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    prep = Prepared(recipe, model, splits, device, example, outputs, baseline, frozen, progress)
    registry = stage_types()
    for spec in recipe.stages:
        check = registry[spec.type].check
        ctx = _context(prep, spec, Path("."), frozen, outputs)
        with located(ctx.where, recipe.source):
            if check is not None:  # stage options that name layers or splits resolve now, not mid-run
                note = check(model, spec.config, ctx)
                if isinstance(note, str):
                    prep.notes[spec.index] = note
            check_finetune(model, spec.config, ctx)  # every stage's finetune.distill block
    return prep


def _task_output(recipe: Recipe, outputs: metrics.Outputs) -> None:
    """Point ``outputs`` at the output the recipe's metric names (or the default rule's).

    Raises:
        CompressError: the named output does not exist, or several outputs and none named; one line
            naming the recipe's ``metric`` and the model's outputs.
    """
    spec = recipe.body.metric
    try:
        outputs.task = require_task(outputs.names, spec.output)
    except CompressError as exc:
        where = recipe.locate("metric", "output") if spec.output is not None else recipe.locate("metric")
        raise CompressError(f"{where}: {exc}") from None


def keep_best_notice(recipe: Recipe) -> str | None:
    """One line for the terminal when fine-tunes ask for keep_best but the recipe has no data.val."""
    if recipe.body.data.val is not None:
        return None
    asking = [spec.dirname for spec in recipe.stages
              if isinstance(cfg := getattr(spec.config, "finetune", None), FinetuneConfig) and cfg.keep_best and cfg.epochs]
    if not asking:
        return None
    which = f"stage {asking[0]} keeps its" if len(asking) == 1 else f"stages {', '.join(asking)} keep their"
    return (f"keep_best off: no data.val split, so {which} last epoch "
            "(add data.val: {holdout: 0.1} to select the best epoch on held-out training data)")


def _context(
    prep: Prepared, spec: StageSpec, run_dir: Path, baseline: nn.Module, input_outputs: metrics.Outputs | None
) -> StageContext:
    return StageContext(
        recipe=prep.recipe,
        spec=spec,
        run_dir=run_dir,
        stage_dir=spec.stage_dir(run_dir),
        splits=prep.splits,
        device=prep.device,
        baseline=baseline,
        baseline_outputs=prep.baseline_outputs,
        example_input=prep.example,
        progress=prep.progress,
        input_outputs=input_outputs,
    )


def _finished(run_dir: Path, recipe: Recipe) -> list[dict[str, Any]]:
    """metrics.json of the leading finished stages (each needs its checkpoint if it changes models).

    A stage counts as finished only if its files are regular files (never read through a link, never a FIFO
    that would block) and its metrics.json is a record of that stage naming its own checkpoint; anything
    else (a damaged or hand-edited file) makes the stage run again.
    """
    registry = stage_types()
    done = []
    for spec in recipe.stages:
        stage_dir = spec.stage_dir(run_dir)
        record = stage_dir / "metrics.json"
        changes_model = registry[spec.type].changes_model
        if not rundir.is_plain_file(record) or (changes_model and not rundir.is_plain_file(stage_dir / "checkpoint.pt")):
            break
        try:
            entry = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            break
        if not (isinstance(entry, dict) and entry.get("type") == spec.type and (not changes_model or (
                entry.get("checkpoint") == spec.checkpoint and isinstance(entry.get("metrics"), dict)))):
            break
        done.append(entry)
    return done


@dataclass
class Outcome:
    run_dir: Path
    report: dict[str, Any]
    exit_code: int


def run(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Log | None = log_stderr,
    warn: Log | None = log_stderr,
) -> Outcome:
    """Run every stage of ``recipe`` into ``out`` (default ``runs/<name>``).

    Returns:
        The run directory, the report, and the exit code (0 passed, 1 an accuracy check failed).

    Raises:
        CompressError: bad recipe, checkpoint, data or run directory (exit code 2).
    """
    say = log or (lambda _msg: None)
    caution = warn or (lambda _msg: None)  # stage warnings: shown even when log lines are off (--quiet)
    run_dir = Path(out) if out is not None else Path("runs") / recipe.name
    init_distributed(pick_device(recipe.body.device))  # under torchrun: rank 0 decides for every rank
    claim, decision = rundir.claim(recipe, run_dir, resume=resume, overwrite=overwrite)
    try:  # the lock is held until the run ends (and dropped by the kernel if the process is killed)
        barrier()
        prep = prepare(recipe, progress=progress)  # every bad input fails here, before anything is written
        tracker = rundir.start(recipe, run_dir, decision, overwrite=overwrite)
        try:
            return _run_stages(prep, run_dir, decision.reuse, tracker, say, caution)
        except BaseException:
            if tracker is not None:
                with contextlib.suppress(OSError):  # what a failed run wrote is still its own (--overwrite)
                    tracker.record()
            raise
    finally:
        if claim is not None:
            claim.release()


def _run_stages(
    prep: Prepared, run_dir: Path, can_reuse: bool, tracker: rundir.Tracker | None, say: Log, caution: Log
) -> Outcome:
    """Run (or, resuming, reuse) each stage, then write the final model and the report (rank 0)."""
    recipe = prep.recipe
    registry = stage_types()
    main = is_main_process()
    baseline_model = prep.baseline_model
    model, current = prep.model, prep.baseline_outputs
    say(f"baseline: {_fmt_metrics(prep.baseline['metrics'])}, {prep.baseline['params']:,} params, {prep.baseline['macs']:,} MACs")
    notice = keep_best_notice(recipe)
    if notice is not None:
        say(notice)
    done = _finished(run_dir, recipe) if can_reuse else []
    last_ckpt = next((run_dir / d["checkpoint"] for d in reversed(done) if d.get("checkpoint")), None)
    if last_ckpt is not None:
        model = models.load_model(last_ckpt, trust=recipe.body.model.trust, allow=recipe_factories(recipe, prep.model))
        model, current = model.to(prep.device), None
        say(f"resume: {len(done)} finished stage(s) reused, continuing from {last_ckpt}")
    entries: list[dict[str, Any]] = []
    sections: dict[str, Any] = {}
    passed = True
    for spec in recipe.stages:
        stage = registry[spec.type]
        step = f"[{spec.index + 1}/{len(recipe.stages)}] {spec.type}"
        if spec.index < len(done):
            record = done[spec.index]
        else:
            ctx = _context(prep, spec, run_dir, baseline_model, current)
            say(f"{step} ...")
            torch.manual_seed(recipe.body.seed + spec.index)
            start = time.perf_counter()
            record = {"type": spec.type}
            if stage.changes_model:  # every rank trains (DDP); rank 0 writes
                with located(ctx.where, recipe.source):
                    result = stage.run(model, spec.config, ctx)
                model = result.model
                current = ctx.outputs(model)
                record["metrics"] = metrics.score(recipe.body.metric.name, current, prep.baseline_outputs)
                record.update(size_stats(model, move_inputs(prep.example, prep.device)))
                record["checkpoint"] = spec.checkpoint
                record.update(result.info, report=result.report, passed=result.passed)
                if result.warnings:
                    record["warnings"] = result.warnings
                if main:
                    models.save(model, run_dir / spec.checkpoint, metadata={"recipe": recipe.name, "stage": spec.dirname})
            else:  # file-producing stages (export) run on rank 0; the others get its record
                if main:
                    with located(ctx.where, recipe.source):
                        result = stage.run(model, spec.config, ctx)
                    record.update(result.info, report=result.report, passed=result.passed)
                    if result.warnings:
                        record["warnings"] = result.warnings
                record = broadcast_object(record)
            record["seconds"] = round(time.perf_counter() - start, 3)
            if main:
                io.write_json(ctx.stage_dir / "metrics.json", record)
            if tracker is not None:
                tracker.record()
            say(f"{step} done in {record['seconds']:.1f}s"
                + (f": {_fmt_metrics(record['metrics'])}" if "metrics" in record else ""))
            for warning in record.get("warnings", []):
                caution(f"{step} WARNING: {warning}")
        sections.update(record.get("report", {}))
        passed = passed and record.get("passed", True)
        if stage.changes_model:
            entries.append({k: v for k, v in record.items() if k not in ("report", "passed")})
    full = report.build(recipe, prep.baseline, entries, sections, passed)
    if main:
        models.save(model, run_dir / "model.pt", metadata={"recipe": recipe.name, "final": True})
        full["provenance"] = report.provenance(recipe, run_dir)
        report.write(run_dir, full)
    if tracker is not None:
        tracker.record()
    barrier()  # no rank exits (and gets torchrun to stop the others) before rank 0 has written everything
    for line in report.engine_summary(sections):
        say(line)
    if "check" in sections:
        say(check_summary(sections["check"]))
    if sections.get("export", {}).get("failures"):
        say("export FAILED: " + "; ".join(sections["export"]["failures"]))
    return Outcome(run_dir, full, 0 if passed else 1)


def check_summary(check: dict[str, Any]) -> str:
    """The terminal line for the export check: the verdict, the drop in points and samples, and its reference."""
    reference = {"baseline": "the input model (baseline)", "model": "the model exported"}.get(check.get("reference", ""),
                                                                                          "the reference")
    moved = f" = {check['drop_samples']} of {check['samples']} samples" if check.get("drop_samples") is not None else ""
    head = f"{check['metric']} drop {check['drop']:.3f} pt{moved} against {reference}"
    return f"check passed: {head}" if check["passed"] else f"check FAILED ({head}): " + "; ".join(check["failures"])


def _fmt_metrics(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k in ("top1", "agreement", "cosine") or ":" in k)


def describe(recipe: Recipe, prep: Prepared) -> list[str]:
    """The plan ``compress validate`` prints: model, data, metric, and each stage's options."""
    body = recipe.body
    source = body.model.checkpoint or "(no checkpoint: factory weights)"
    factory = structure.origin_of(prep.model)
    lines = [
        f"recipe  {recipe.name} ({recipe.source})",
        f"model   {factory.factory if factory else body.model.factory} {factory.kwargs if factory else body.model.kwargs} "
        f"from {source}: {prep.baseline['params']:,} params, {prep.baseline['macs']:,} MACs",
    ]
    for split in ("train", "val", "calibration", "eval"):
        if prep.splits.has(split):
            loader = prep.splits.loader(split)
            role = " (selects: keep_best)" if split == "val" else ""
            lines.append(f"data    {split}: {prep.splits.origin(split)}, {len(loader.dataset)} samples, "  # type: ignore[arg-type]
                         f"batch {loader.batch_size}{role}")
    output = f" on output '{prep.baseline_outputs.task}'" if len(prep.baseline_outputs.tensors) > 1 else ""
    lines.append(f"metric  {body.metric.name}{output}: baseline {_fmt_metrics(prep.baseline['metrics'])}")
    for spec in recipe.stages:
        lines.append(f"stage {spec.index + 1} {spec.type} {json.dumps(spec.config.model_dump(mode='json'))}")
        if spec.index in prep.notes:
            lines.append(f"        {prep.notes[spec.index]}")
    notice = keep_best_notice(recipe)
    if notice is not None:
        lines.append(f"note    {notice}")
    return lines


def _quantizing_stage(recipe: Recipe) -> StageSpec | None:
    """The recipe's first stage that quantizes with :class:`QuantOptions` (ptq, qat), if any."""
    registry = stage_types()
    for spec in recipe.stages:
        if isinstance(spec.config, QuantOptions) and registry[spec.type].effects(spec.config) & Effect.QUANTIZES:
            return spec
    return None


def sensitivity(recipe: Recipe, *, progress: bool = True, log: Log | None = None) -> tuple[Sensitivity, str]:
    """``compress sensitivity``: the per-unit table of the recipe's input model quantized as its first ptq/qat
    stage would (placed and calibrated with its options; earlier stages are not run), measured on ``data.val``;
    an input model that is quantized already (a QAT checkpoint), in a recipe without such a stage, as it is.
    Nothing is written.

    Returns:
        The table, and one line saying what was measured.

    Raises:
        CompressError: bad recipe, model or data; a float model and no ptq/qat stage; no ``data.val``.
    """
    prep = prepare(recipe, progress=progress)
    spec = _quantizing_stage(recipe)
    output = recipe.body.metric.output
    if spec is None:
        if not is_quantized(prep.model):
            raise CompressError(f"{recipe.locate('stages')}: no ptq or qat stage and the model is not quantized: "
                                "sensitivity needs to know how to quantize")
        where = recipe.locate("data", "val")
        metric, qmodel = recipe.body.metric.name, prep.model
        what = f"{recipe.name}: the input model as quantized"
    else:
        ctx = _context(prep, spec, Path("."), prep.baseline_model, prep.baseline_outputs)
        budget = getattr(spec.config, "budget", None)
        metric = (budget.metric if budget is not None else None) or ctx.metric
        where = ctx.where
        with located(ctx.where, recipe.source):
            prep.splits.loader("val", needed_by=f"{ctx.where} (sensitivity, measured on data.val)")
            qmodel, _ = quantize(copy.deepcopy(prep.model), spec.config, ctx)  # type: ignore[arg-type]
        earlier = [s.type for s in recipe.stages[:spec.index]]
        what = (f"{recipe.name}: stage {spec.index + 1} {spec.type} on the input model"
                + (f" (stages before it not run: {', '.join(earlier)})" if earlier else ""))
    with located(where, recipe.source):
        loader = prep.splits.loader("val", needed_by="compress sensitivity (measured on data.val)")
        table = measure_sensitivity(qmodel, loader, metric, output=output, announce=log)
    return table, f"{what}, {metric} on data.val ({table.samples} samples)"
