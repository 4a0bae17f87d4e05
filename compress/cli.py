"""The ``compress`` command: run, validate, check.

Exit codes: 0 success; 1 an accuracy check failed; 2 bad input (one-line message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from compress.errors import CompressError, one_line


class _UsageError(Exception):
    """A command-line argument problem; ``main`` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line (no usage block) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="compress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    run = sub.add_parser("run", parents=[common], help="run a recipe's stages")
    run.add_argument("recipe", type=Path)
    run.add_argument("--out", type=Path, help="run directory (default runs/<recipe name>)")
    existing = run.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue after the last finished stage")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")

    val = sub.add_parser("validate", parents=[common], help="dry run: check the recipe, model and data, print the plan")
    val.add_argument("recipe", type=Path)
    for p in (run, val):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. stages.0.train.finetune.epochs=5")

    chk = sub.add_parser("check", parents=[common], help="compare a model/engine with a reference on data")
    chk.add_argument("model", help="engine or ONNX file (.onnx) or compress checkpoint (.pt)")
    chk.add_argument("--reference", required=True, help="the reference: .onnx or .pt")
    chk.add_argument("--data", required=True, help="digits[:SPLIT], npz:FILE, imagefolder:DIR or python:MOD:FN")
    chk.add_argument("--metric", default="top1", help="top1, agreement, cosine or module:callable")
    chk.add_argument("--max-drop", type=float, default=0.5, help="largest allowed metric drop in points")
    chk.add_argument("--min-agreement", type=float)
    chk.add_argument("--min-cosine", type=float)
    chk.add_argument("--batch-size", type=int, default=64)
    chk.add_argument("--report", type=Path, default=Path("check_report.json"),
                     help="where to write the drift report (JSON; default check_report.json)")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from compress import pipeline
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    outcome = pipeline.run(
        recipe, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
        log=None if args.quiet else pipeline.log_stderr,
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


def _cmd_check(args: argparse.Namespace) -> int:
    from compress.data import build_loader, parse_data_arg
    from compress.export.check import check

    loader = build_loader(parse_data_arg(args.data, args.batch_size), "--data")
    result = check(
        args.model, args.reference, loader, metric=args.metric, max_drop=args.max_drop,
        min_agreement=args.min_agreement, min_cosine=args.min_cosine,
    )
    from compress import io

    io.write_json(args.report, {"model": args.model, "reference": args.reference, "data": args.data, **result.to_dict()})
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(
            f"{result.metric}: model {result.model_metric:.4f} reference {result.reference_metric:.4f} "
            f"drop {result.drop:.3f} pt | agreement {result.agreement:.4f} cosine {result.cosine:.6f} "
            f"max abs {result.max_abs:.3g} | {result.samples} samples"
        )
        print("passed" if result.passed else "FAILED: " + "; ".join(result.failures))
    return 0 if result.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"compress: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    handlers = {"run": _cmd_run, "validate": _cmd_validate, "check": _cmd_check}
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
    except KeyboardInterrupt:
        print("compress: interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
