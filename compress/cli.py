"""The ``compress`` command: run, validate, sensitivity, check, bench.

Exit codes: 0 success; 1 an accuracy check failed; 2 bad input (one-line message on stderr); 141 stdout
closed early (``compress ... --json | head``), as a command killed by SIGPIPE reports in a shell.

Only the standard library and torch-free modules load before a command runs, so ``--help`` and
``--version`` answer at once; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from compress.data_arg import FORMS as DATA_FORMS
from compress.errors import CompressError, one_line
from compress.optimization_level import Optimization

if TYPE_CHECKING:
    import torch

    from compress.export.reference import Reference
    from compress.recipe import DataSpec, Recipe


class _UsageError(Exception):
    """A command-line argument problem; ``main`` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line (no usage block) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


_LOGGER = "compress"  # stage lines go to this logger; the CLI shows them on stderr
_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


def _version() -> str:
    """The installed package's version, else the source tree's ``compress.__version__``."""
    from importlib import metadata

    try:
        return metadata.version("compress")
    except metadata.PackageNotFoundError:
        import compress

        return getattr(compress, "__version__", "unknown")


def _batch_sizes(text: str) -> list[int]:
    """``--batch-sizes`` value: ``8`` or ``1,8,32`` (several values may follow the flag)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()] or [int(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a batch size or a list like 1,8,32") from None


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--quiet/-v/--json, accepted before the command and after it (SUPPRESS: one given before is kept)."""
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only: no progress bars or stage lines")
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also debug lines (what was read, what is timed)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compress", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    _add_output_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="run, validate, sensitivity, check or bench ('compress COMMAND --help' for its options)")

    common = _Parser(add_help=False)
    _add_output_flags(common)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout (only the JSON)")

    run = sub.add_parser("run", parents=[common], help="run a recipe's stages")
    run.add_argument("recipe", type=Path, help="the recipe (YAML)")
    run.add_argument("--out", type=Path, help="run directory (default runs/<recipe name>)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue after the last finished stage")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")

    val = sub.add_parser("validate", parents=[common], help="dry run: check the recipe, model and data, print the plan")
    val.add_argument("recipe", type=Path, help="the recipe (YAML)")
    sens = sub.add_parser("sensitivity", parents=[common],
                          help="per-layer INT8 sensitivity of a recipe's model on data.val (changes nothing)")
    sens.add_argument("recipe", type=Path, help="the recipe (YAML)")
    for p in (run, val, sens):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. stages.0.train.finetune.epochs=5")

    chk = sub.add_parser("check", parents=[common], help="compare a model/engine with a reference on data")
    chk.add_argument("model", help="TensorRT engine (.plan/.engine), ONNX file (.onnx) or compress checkpoint (.pt)")
    chk.add_argument("--reference", required=True,
                     help="the reference: .onnx, .plan, .pt, or a reference file written by --save-reference (.npz)")
    source = chk.add_mutually_exclusive_group()
    source.add_argument("--data", help=f"{DATA_FORMS}, options after '?': "
                                       "python:pkg.mod:fn?split=test&n=32, digits:test?size=32 "
                                       "(not with a saved reference, which carries its inputs)")
    source.add_argument("--recipe", type=Path, help="take the data (its eval split) and the metric from this recipe")
    chk.add_argument("--data-kwargs", metavar="MAPPING",
                     help="options for --data as JSON/YAML, e.g. '{\"split\": \"test\"}' (a python factory's keyword arguments)")
    chk.add_argument("--save-reference", type=Path, metavar="FILE.npz",
                     help="also store the inputs and the reference's outputs, to check against later")
    chk.add_argument("--layers", type=int, nargs="?", const=5, metavar="N",
                     help="MODEL .onnx: list the N layers (default 5) where the error against the reference jumps most "
                          "(an optimised engine is tapped on its un-fused view; the verdict runs at --optimization)")
    chk.add_argument("--metric", help="top1 (default, or the recipe's), pixel_accuracy, miou, agreement, cosine or "
                                      "module:callable")
    chk.add_argument("--output", metavar="NAME", help="for models with several outputs: the one the metric applies to "
                                                      "(default: the recipe's metric.output, the only one, logits or out); "
                                                      "every output is compared")
    chk.add_argument("--max-drop", type=float, help="largest allowed metric drop in points (default 0.5 unless "
                                                    "--max-drop-samples is given)")
    chk.add_argument("--max-drop-samples", type=int, metavar="N",
                     help="largest allowed drop in samples, lost minus gained (top1 or agreement)")
    chk.add_argument("--min-agreement", type=float, metavar="F",
                     help="smallest allowed share of samples where MODEL and REF agree on the arg-max (0..1)")
    chk.add_argument("--min-cosine", type=float, metavar="F",
                     help="smallest allowed mean cosine similarity of MODEL's and REF's outputs (-1..1)")
    chk.add_argument("--max-rel-error", type=float, metavar="F",
                     help="largest max|MODEL - REF| / RMS(REF); default 1e-4 when both run in float32, and against "
                          "a saved reference the drift bound calibrated for MODEL's own saved outputs")
    chk.add_argument("--batch-size", type=int, help="default 64, or the recipe's data.eval batch_size")
    chk.add_argument("--optimization", choices=[o.value for o in Optimization], default=Optimization.all.value,
                     help="ONNX Runtime graph optimisation level for .onnx files (default all, as a deployed session)")
    chk.add_argument("--trust", action="append", default=[], metavar="MODULE",
                     help="a module whose factories .pt checkpoints may name (beside compress.zoo and torchvision.models)")
    chk.add_argument("--report", type=Path, default=Path("check_report.json"),
                     help="where to write the drift report (JSON; default check_report.json)")
    bench = sub.add_parser("bench", parents=[common], help="latency p50/p90/p99 and throughput per batch size")
    bench.add_argument("models", nargs="+", help="ONNX files, TensorRT engines (.plan/.engine) and/or compress "
                                                 "checkpoints (PyTorch eager, the baseline)")
    bench.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                       help="what runs the .onnx files (tensorrt builds an engine for the run first)")
    shape = bench.add_mutually_exclusive_group()
    shape.add_argument("--data", help="take the input from data: digits[:SPLIT], npz:FILE, ... (default: the inputs "
                                      "the first .onnx file declares)")
    shape.add_argument("--input-shape", action="append", metavar="[NAME=]D1,D2,...",
                       help="one sample's shape, batch left out, e.g. 1,8,8; for an .onnx file it sizes the dynamic "
                            "dimensions (NAME=... per input of a model with several; repeat the flag)")
    bench.add_argument("--data-kwargs", metavar="MAPPING", help="options for --data as JSON/YAML, e.g. '{\"split\": \"test\"}'")
    bench.add_argument("--batch-sizes", type=_batch_sizes, nargs="+", metavar="N[,N...]",
                       help="batch sizes to time: 1,8,32 or 1 8 32 (default 1,8,32)")
    bench.add_argument("--threads", type=int, help="intra-op threads (ONNX Runtime and torch)")
    bench.add_argument("--optimization", choices=[o.value for o in Optimization], default=Optimization.all.value,
                       help="ONNX Runtime graph optimisation level (default all, as a deployed session)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed runs per model and batch size first (default 5)")
    budget = bench.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, default=2.0, metavar="S",
                        help="time each batch size for about S seconds (default 2), at least --min-iters runs")
    budget.add_argument("--iters", type=int, help="time exactly N runs per batch size instead of --seconds")
    bench.add_argument("--min-iters", type=int, default=50, metavar="N",
                       help="fewest timed runs per batch size under --seconds (default 50)")
    bench.add_argument("--report", type=Path, help="also write the results as JSON here")
    bench.add_argument("--trust", action="append", default=[], metavar="MODULE",
                       help="a module whose factories .pt checkpoints may name (beside compress.zoo and torchvision.models)")
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    import math

    from compress import io
    from compress.export import bench
    from compress.export.stage import MAX_BATCH

    batch_sizes = [b for group in (args.batch_sizes or [[1, 8, 32]]) for b in group]
    # the recipe's engine bounds: a batch of 10^9 inputs needs terabytes, a million threads stalls the machine
    if (any(not 0 < b <= MAX_BATCH for b in batch_sizes) or (args.iters is not None and args.iters <= 0)
            or args.warmup < 0 or (args.threads is not None and not 0 < args.threads <= 1024)):
        raise CompressError(f"bench: --batch-sizes, --iters and --threads must be positive (batch sizes at most "
                            f"{MAX_BATCH}, threads at most 1024), --warmup >= 0")
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= 3600) or not 0 < args.min_iters <= 100_000:
        raise CompressError(f"bench: --seconds must be in (0, 3600] and --min-iters in [1, 100000], not "
                            f"{args.seconds:g} and {args.min_iters}")
    _check_writable("--report", args.report)
    _check_outputs_spare_inputs([("--report", args.report)], args.models)
    if args.data is None and args.data_kwargs is not None:
        raise CompressError("--data-kwargs: needs --data")
    sample = _bench_sample(args, batch_sizes)
    iters = args.iters
    logging.getLogger(_LOGGER).debug("bench: %s per batch size %s", f"{iters} runs" if iters is not None else
                                     f"about {args.seconds:g} s (at least {args.min_iters} runs)", batch_sizes)
    results = bench.compare(args.models, sample, batch_sizes, threads=args.threads, backend=args.backend,
                            trust=_trust(args), warmup=args.warmup, iters=iters,
                            seconds=None if iters is not None else args.seconds, min_iters=args.min_iters,
                            optimization=Optimization(args.optimization))
    if args.report is not None:
        io.write_json(args.report, results)
    print(json.dumps(results, indent=2) if args.json else "\n".join(bench.table(results)))
    return 0


def _bench_sample(args: argparse.Namespace, batch_sizes: list[int]) -> Any:
    """One sample to time: from --data, from the first .onnx file's declared inputs (sized by --input-shape
    where dynamic), or of --input-shape for models that declare none."""
    import torch

    from compress.export.declared_inputs import parse_shape_args, sample_from_declared

    if args.data is not None:
        from compress.data import build_loader, example_input, parse_data_arg

        sample = example_input(build_loader(parse_data_arg(args.data, 1, args.data_kwargs), f"--data {args.data}"))
        if not isinstance(sample, torch.Tensor):
            raise CompressError(f"--data {args.data}: bench times models of one input tensor; this data has several "
                                "(token ids, masks): time the engine with a recipe's export stage instead")
        return sample
    shapes = parse_shape_args(args.input_shape or [])
    onnx_file = next((m for m in args.models if Path(m).suffix == ".onnx"), None)
    if onnx_file is not None:
        return sample_from_declared(onnx_file, shapes, batch_sizes)
    if not shapes:
        raise CompressError("bench: give --data or --input-shape: no .onnx file among the models to read the "
                            "input shape from")
    if None not in shapes or len(shapes) > 1:
        raise CompressError("bench --input-shape: NAME=... needs an .onnx file among the models; give one "
                            "sample's shape, e.g. 1,8,8")
    return torch.randn(1, *shapes[None], generator=torch.Generator().manual_seed(0))


def _cmd_run(args: argparse.Namespace) -> int:
    from compress import pipeline
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.out is not None and (not str(args.out).strip() or Path.cwd().resolve().is_relative_to(args.out.resolve())):
        raise CompressError(f"--out '{args.out}': is the current directory or a folder above it; the run would write "
                            "over your files there; name a new folder, e.g. --out runs/NAME")
    log = logging.getLogger(_LOGGER)
    outcome = pipeline.run(
        recipe, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
        log=log.info, warn=log.warning,
    )
    from compress.train import is_main_process

    if is_main_process():
        print(json.dumps(outcome.report, indent=2) if args.json else f"report: {outcome.run_dir / 'report.json'}")
    return outcome.exit_code


def _cmd_validate(args: argparse.Namespace) -> int:
    from compress import pipeline
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    prep = pipeline.prepare(recipe, progress=not args.quiet)
    if args.json:
        print(json.dumps({"recipe": recipe.resolved(), "baseline": prep.baseline}, indent=2))
    else:
        print("\n".join(pipeline.describe(recipe, prep)))
        print("valid")
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from compress import pipeline
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    log = logging.getLogger(_LOGGER)
    table, what = pipeline.sensitivity(recipe, progress=not args.quiet, log=log.info)
    if args.json:
        print(json.dumps({"what": what, **table.to_dict()}, indent=2))
    else:
        print(_sensitivity_text(table, what))
    return 0


def _sensitivity_text(table: Any, what: str) -> str:
    """The table as ``compress sensitivity`` prints it: most harm first (what a budget floats first)."""
    lines = [what,
             f"{table.metric}: float {table.float_score:.4f}, all INT8 {table.int8_score:.4f} (drop {table.drop} pt); "
             f"{table.passes} forward passes, {table.seconds:.1f} s",
             f"{'unit':<40} {'kind':<9} {'MACs':>12} {'MACs %':>7} {'drop alone':>10} {'recovery':>9} "
             f"{'cos alone':>9} {'cos float':>9}"]
    for r in table.ranked():
        share = 100 * r.macs / table.macs if table.macs else 0.0
        lines.append(f"{r.name:<40} {r.kind:<9} {r.macs:>12,} {share:>6.1f}% {r.drop_alone:>10.2f} "
                     f"{r.recovery_alone:>9.2f} {r.fidelity_alone:>9.4f} {r.fidelity_float:>9.4f}")
    lines.append("drop alone: points lost with only that unit INT8; recovery: points won back with only it float")
    return "\n".join(lines)


def _cmd_check(args: argparse.Namespace) -> int:
    from compress import io
    from compress.export.check import as_runner, compare

    recipe, saved_ref, spec = _check_setup(args)
    batches, inputs = _check_batches(args, saved_ref, recipe, spec)
    level = Optimization(args.optimization)
    runner = as_runner(args.model, optimization=level, trust=_trust(args))
    out, ref, max_rel_error = _check_collect(args, runner, saved_ref, batches, level)
    result = compare(out, ref, metric=args.metric, max_drop=args.max_drop, max_drop_samples=args.max_drop_samples,
                     min_agreement=args.min_agreement, min_cosine=args.min_cosine, max_rel_error=max_rel_error)
    drift = _saved_drift(args, saved_ref, out, result) if saved_ref is not None else None  # may fail the result
    data = args.data if recipe is None else f"{args.recipe} (data.eval)"
    doc = {"model": args.model, "reference": args.reference, "data": data, "optimization": level.value,
           **result.to_dict(), **({"drift": drift} if drift is not None else {})}
    if spec is not None:  # what was read, every option in effect: a factory's default split shows here
        from compress.data import describe_spec

        doc["data_used"] = describe_spec(spec)
        doc["data_spec"] = spec.model_dump(mode="json")
    if args.layers is not None:
        doc.update(_check_layers(args, batches))
    if args.save_reference is not None:
        doc.update(_check_save_reference(args, out, ref, inputs, level, data))
    io.write_json(args.report, doc)
    io.write_text(args.report.with_suffix(".md"), _check_markdown(doc))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_check(args, doc, result)
    return 0 if result.passed else 1


def _check_setup(args: argparse.Namespace) -> tuple[Recipe | None, Reference | None, DataSpec | None]:
    """Every argument of ``compress check`` checked before any model loads; ``args.metric``/``args.output``
    filled from the recipe. Returns the recipe, the saved reference file's contents and the data spec."""
    from compress import metrics
    from compress.export.reference import is_reference_file, load_reference

    if args.batch_size is not None and args.batch_size <= 0:
        raise CompressError(f"--batch-size: must be positive, not {args.batch_size}")
    _check_thresholds(args)
    _check_writable("--report", args.report)
    _check_writable("--report", args.report.with_suffix(".md"))
    _check_writable("--save-reference", args.save_reference)
    _check_outputs_spare_inputs([("--report", args.report), ("--report", args.report.with_suffix(".md")),
                                 ("--save-reference", args.save_reference)], [args.model, args.reference, args.recipe])
    recipe = None
    if args.recipe is not None:
        from compress.recipe import load_recipe

        recipe = load_recipe(args.recipe)
    args.metric = args.metric or (recipe.body.metric.name if recipe is not None else "top1")
    args.output = args.output or (recipe.body.metric.output if recipe is not None else None)
    try:
        metrics.check_metric_name(args.metric)
    except ValueError as exc:
        raise CompressError(f"--metric: {exc}") from None
    saved = is_reference_file(args.reference)
    if saved and (args.data is not None or recipe is not None):
        flag = "--data" if args.data is not None else "--recipe"
        raise CompressError(f"{flag}: {args.reference} is a saved reference and carries its own inputs; drop {flag}")
    if saved and (args.save_reference is not None or args.layers is not None):
        raise CompressError("--save-reference/--layers need a reference model (.onnx or .pt), not a saved reference")
    if not saved and args.data is None and recipe is None:
        raise CompressError("--data or --recipe: required unless --reference is a saved reference file")
    if args.data_kwargs is not None and args.data is None:
        raise CompressError("--data-kwargs: needs --data")
    spec = None
    if args.data is not None:
        from compress.data import parse_data_arg

        spec = parse_data_arg(args.data, args.batch_size or 64, args.data_kwargs)  # bad --data: before any model loads
    elif recipe is not None:
        spec = recipe.body.data.eval
        if args.batch_size is not None:
            spec = spec.model_copy(update={"batch_size": args.batch_size})
    if args.layers is not None and (Path(args.model).suffix != ".onnx" or args.layers < 1):
        raise CompressError("--layers: needs MODEL as an .onnx file and N >= 1")
    return recipe, (load_reference(args.reference) if saved else None), spec


def _check_collect(args: argparse.Namespace, runner: Any, saved_ref: Reference | None, batches: list[Any],
                   level: Optimization) -> tuple[Any, Any, float | None]:
    """MODEL's and REF's outputs (REF's from the saved file when it is one) and the max_rel_error to apply."""
    from compress import metrics
    from compress.export.check import as_runner
    from compress.export.drift import FLOAT_TOLERANCE, is_fp32

    if saved_ref is not None:
        (out,) = metrics.collect_many([runner], batches, names=[args.model], output=args.output)
        ref = metrics.alongside(out, saved_ref.outputs, saved_ref.labels)
        if tuple(out.logits.shape) != tuple(ref.logits.shape):
            raise CompressError(f"{args.model}: outputs {list(out.logits.shape)} but {args.reference} holds "
                                f"{list(ref.logits.shape)}")
        return out, ref, None  # REF's saved outputs: the thresholds as given; MODEL's own: the drift bound
    ref_runner = as_runner(args.reference, optimization=level, trust=_trust(args))
    out, ref = metrics.collect_many([runner, ref_runner], batches, names=[args.model, args.reference],
                                    output=args.output)
    fp32 = args.max_rel_error is None and is_fp32(runner) and is_fp32(ref_runner)
    return out, ref, FLOAT_TOLERANCE if fp32 else _finite(args.max_rel_error)


def _check_layers(args: argparse.Namespace, batches: list[Any]) -> dict[str, Any]:
    """``--layers``: where MODEL and REF part, layer by layer, for the report."""
    import torch

    from compress.data import split_batch
    from compress.export.localize import localize

    if not all(isinstance(split_batch(b)[0], torch.Tensor) for b in batches):
        raise CompressError("--layers: localizes models of one input tensor; this data has several (token ids, masks)")
    found = localize(args.model, args.reference, (split_batch(b)[0] for b in batches), trust=_trust(args))
    return {"layers": [e.to_dict() for e in found.layers], "unmatched_layers": found.unmatched,
            "layers_view": found.view}  # the taps' view; the verdict ran at the deployed level


def _check_save_reference(args: argparse.Namespace, out: Any, ref: Any, inputs: torch.Tensor | None,
                          level: Optimization, data: str) -> dict[str, Any]:
    """``--save-reference``: write REF's outputs with MODEL's own and their calibrated drift bound."""
    from compress.export.drift import calibrate, file_digest
    from compress.export.reference import save_reference
    from compress.report import _versions

    if len(ref.tensors) > 1:
        raise CompressError(f"--save-reference: stores one output, but {args.reference} returns "
                            f"{len(ref.tensors)} ({', '.join(ref.names)})")
    bound = calibrate(args.model, inputs, out.logits, args.batch_size or 64)
    drift = {**bound.to_dict(), "model": str(args.model), "model_sha256": file_digest(args.model),
             "optimization": level.value}
    save_reference(args.save_reference, inputs, ref.logits, ref.labels,
                   {"reference": str(args.reference), "data": data, "versions": _versions(), "drift": drift},
                   model_outputs=out.logits)
    return {"saved_drift_tolerance": bound.tolerance, "saved_reference": str(args.save_reference)}


def _print_check(args: argparse.Namespace, doc: dict[str, Any], result: Any) -> None:
    """The check's verdict for people (``--json`` prints ``doc`` instead)."""
    of = f" of {doc['data_used']}" if "data_used" in doc else ""  # what was read: a default train split shows
    print(
        f"{result.metric}: model {result.model_metric:.4f} reference {result.reference_metric:.4f} "
        f"drop {result.drop:.3f} pt{'' if result.drop_samples is None else f' ({result.drop_samples} {result.drop_unit})'} "
        f"| agreement {result.agreement:.4f} cosine {result.cosine:.6f} "
        f"max abs {result.max_abs:.3g} | {result.samples} samples{of}"
    )
    if "drift" in doc:
        d = doc["drift"]
        print(f"drift vs the outputs saved for {d['saved_from']}: max |error| {d['rel_error']:.3g} of their RMS "
              f"(bound {d['max_rel_error']:.3g}) | {d['changed']} samples changed their arg-max"
              if d["max_rel_error"] is not None else f"drift: not checked ({d['note']})")
    for entry in doc.get("layers", [])[: args.layers]:
        print(f"  layer {entry['layer']}: error {entry['rel_error']:.4g} (jump {entry['jump']:+.4g})")
    if doc.get("layers_view", {}).get("model", {}).get("unfused"):
        ops = ", ".join(f"{n} {op}" for op, n in doc["layers_view"]["model"]["unfused"].items())
        print(f"  (layers tapped on MODEL's un-fused view: {ops} rewritten as plain ops, optimisation off; "
              f"the verdict ran at {doc['optimization']})")
    print("passed" if result.passed else "FAILED: " + "; ".join(result.failures))


def _check_writable(flag: str, path: Path | None) -> None:
    """Refuse an output path that cannot be written before any work is done."""
    from compress import io

    problem = None if path is None else io.why_unwritable(path)
    if problem is not None:
        raise CompressError(f"{flag} {path}: cannot be written ({problem})")


def _same_file(a: Path, b: object) -> bool:
    try:
        return os.path.samefile(a, b)  # a link or another spelling of the same file included
    except (OSError, TypeError, ValueError):  # not there (yet): compare the paths
        return Path(a).resolve() == Path(str(b)).resolve()


def _check_outputs_spare_inputs(outputs: Sequence[tuple[str, Path | None]], inputs: Sequence[object]) -> None:
    """Refuse an output path that names an input of the command (or another output): writing it would
    replace the user's model, checkpoint or recipe (``--report model.pt``, ``--save-reference engine.onnx``)."""
    named = [(flag, path) for flag, path in outputs if path is not None]
    for i, (flag, path) in enumerate(named):
        for other in [p for p in inputs if p is not None] + [p for _, p in named[i + 1:]]:
            if _same_file(path, other):
                raise CompressError(f"{flag} {path}: is also {other}, which this command reads or writes; writing "
                                    "it would replace that file; name another file")


def _saved_drift(args: argparse.Namespace, saved: Reference, out: Any, result: Any) -> dict[str, Any]:
    """MODEL against its own outputs saved in the reference file, under the bound calibrated then (or
    --max-rel-error); a failure is added to ``result``'s."""
    from compress.export.check import compare
    from compress.export.drift import file_digest
    from compress.metrics import alongside

    if saved.model_outputs is None:
        return {"max_rel_error": None, "note": "the reference file holds no model outputs (written before v2)"}
    meta = saved.meta["drift"]
    bound = float(meta["tolerance"]) if args.max_rel_error is None else _finite(args.max_rel_error)
    if bound is None:
        return {"max_rel_error": None, "note": "turned off by --max-rel-error inf", "calibration": meta}
    drift = compare(out, alongside(out, saved.model_outputs, saved.labels), metric="agreement", max_rel_error=bound)
    same = meta.get("model_sha256") is not None and meta.get("model_sha256") == file_digest(args.model)
    other = "" if same else f" ({args.model} is not the file these outputs were saved for: {meta.get('model')})"
    result.failures.extend(f"drift: {f}{other}" for f in drift.failures)
    result.passed = not result.failures
    return {"rel_error": drift.rel_error, "max_rel_error": bound, "changed": drift.changed, "max_abs": drift.max_abs,
            "passed": drift.passed, "saved_from": meta.get("model"), "same_file": same, "calibration": meta}


def _finite(bound: float | None) -> float | None:
    """A bound as compare takes it: ``inf`` (the user turning it off) is no bound."""
    return None if bound is None or bound == float("inf") else bound


def _trust(args: argparse.Namespace) -> list[str]:
    """``--trust`` module names, checked: a name, never a path."""
    from compress.trust import check_module_name

    try:
        return [check_module_name(name) for name in args.trust]
    except ValueError as exc:
        raise CompressError(f"--trust: {exc}") from None


def _check_thresholds(args: argparse.Namespace) -> None:
    """Refuse thresholds no result can be measured against (NaN, out of range); default --max-drop to 0.5."""
    import math

    bounds = {"max_drop": (0.0, math.inf), "min_agreement": (0.0, 1.0), "min_cosine": (-1.0, 1.0),
              "max_rel_error": (0.0, math.inf)}
    for name, (low, high) in bounds.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:  # NaN fails every comparison
            raise CompressError(f"--{name.replace('_', '-')}: {value} is outside [{low:g}, {high:g}]")
    if args.max_drop_samples is not None and args.max_drop_samples < 0:
        raise CompressError(f"--max-drop-samples: must be >= 0, not {args.max_drop_samples}")
    if args.max_drop is None and args.max_drop_samples is None:
        args.max_drop = 0.5


def _check_batches(args: argparse.Namespace, saved: Reference | None, recipe: Recipe | None, spec: DataSpec | None
                   ) -> tuple[list[Any], torch.Tensor | None]:
    """The batches to check on (a list: --layers reads them twice) and all inputs (for --save-reference)."""
    import torch

    from compress.data import build_loader, split_batch

    if saved is not None:
        size = max(args.batch_size or 64, 1)
        starts = range(0, len(saved.inputs), size)
        if saved.labels is None:
            return [(saved.inputs[i : i + size],) for i in starts], saved.inputs
        return [(saved.inputs[i : i + size], saved.labels[i : i + size]) for i in starts], saved.inputs
    if spec is None:
        raise CompressError("--data or --recipe: required unless --reference is a saved reference file")
    name = recipe.locate("data", "eval") if recipe is not None else f"--data {args.data}"
    batches = list(build_loader(spec, name))
    if args.save_reference is not None and not all(isinstance(split_batch(b)[0], torch.Tensor) for b in batches):
        raise CompressError(f"--save-reference: a reference file stores one input tensor per sample; {name} has "
                            "several inputs (token ids, masks): check against the model (--reference) instead")
    inputs = torch.cat([split_batch(b)[0] for b in batches]) if args.save_reference is not None else None
    return batches, inputs


def _check_markdown(doc: dict) -> str:
    lines = [f"# compress check: {doc['model']} vs {doc['reference']}", "",
             f"Result: **{'passed' if doc['passed'] else 'FAILED'}** on {doc['samples']} samples", "",
             f"| {doc['metric']} model | reference | drop (pt) | agreement | cosine | max abs | mean abs |",
             "|---:|---:|---:|---:|---:|---:|---:|",
             f"| {doc['model_metric']:.4f} | {doc['reference_metric']:.4f} | {doc['drop']:.3f} | {doc['agreement']:.4f} "
             f"| {doc['cosine']:.6f} | {doc['max_abs']:.3g} | {doc['mean_abs']:.3g} |"]
    lines += [f"- {f}" for f in doc["failures"]]
    if len(doc.get("outputs", {})) > 1:  # every output was compared: one row each (the task output marked)
        lines += ["", "| output | agreement | cosine | max abs | mean abs | rel. error |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| `{name}`{' (metric)' if name == doc.get('output') else ''} | {f['agreement']:.4f} | "
                  f"{f['cosine']:.6f} | {f['max_abs']:.3g} | {f['mean_abs']:.3g} | {f['rel_error']:.3g} |"
                  for name, f in doc["outputs"].items()]
    if doc.get("layers"):
        lines += ["", "## Layers where the error jumps most", "", "| layer | rel. error | jump |", "|---|---:|---:|"]
        lines += [f"| `{e['layer']}` | {e['rel_error']:.4g} | {e['jump']:+.4g} |" for e in doc["layers"][:10]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """The ``compress`` command; returns its exit code.

    A closed stdout (``compress ... --json | head -c 10``) ends quietly with exit 141, the way the Python
    docs advise (signal module, "Note on SIGPIPE"): stdout is pointed at devnull, so the interpreter's last
    flush does not fail again with a traceback.
    """
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return _BROKEN_PIPE


def _log_handler(args: argparse.Namespace) -> logging.Handler:
    """A stderr handler on the ``compress`` logger at the level -v/--quiet ask (info by default: the lines
    a user sees, as plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    logger = logging.getLogger(_LOGGER)
    logger.setLevel(handler.level)
    logger.addHandler(handler)
    return handler


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"compress: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if args.quiet and args.verbose:
        print("compress: error: --quiet and --verbose: pick one", file=sys.stderr)
        return 2
    import compress

    compress.load_all()  # every stage type and checkpoint rebuild registered, as a library user's compress.X has it
    handlers = {"run": _cmd_run, "validate": _cmd_validate, "sensitivity": _cmd_sensitivity, "check": _cmd_check,
                "bench": _cmd_bench}
    handler = _log_handler(args)
    try:
        return handlers[args.command](args)
    except CompressError as exc:
        print(f"compress: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as exc:
        # e.g. --out names a file, or a directory we may not write: bad arguments. Other OS errors
        # (a full disk) are the machine's problem, not the input's, and keep their traceback.
        print(f"compress: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a path the OS refuses by its shape (too long, a symlink loop): the input's fault
        if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
            raise
        print(f"compress: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.getLogger(_LOGGER).removeHandler(handler)
        logging.getLogger(_LOGGER).setLevel(logging.NOTSET)
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
