"""report.json (machine-readable), report.md (for people) and the accuracy-vs-size plot."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

from compress import io
from compress.recipe import Recipe
from compress.report_latency import LATENCY_PLOT, latency_section, plot_latency

PLOT_NAME = "report_tradeoff.png"  # accuracy vs engine latency and size
BUDGET_PLOT = "report_budget.png"  # written when a stage searched an accuracy budget


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from compress import __version__

    return {
        "compress": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _tensorrt_version() -> str | None:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        return importlib.metadata.version("tensorrt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Where the run's results came from: library versions and the sha256 of every input and output file."""
    files = {
        "recipe": Path(recipe.source),
        "resolved_recipe": run_dir / "recipe.yaml",
        "input_checkpoint": Path(recipe.body.model.checkpoint) if recipe.body.model.checkpoint else None,
        "model": run_dir / "model.pt",
        "onnx": run_dir / "model.onnx",
        "fp16_onnx": run_dir / "model.fp16.onnx",
        "engine": next((p for p in (run_dir / "engine.onnx", run_dir / "engine.plan") if p.is_file()), None),
    }
    hashes = {key: {"path": str(path), "sha256": io.sha256_file(path)} for key, path in files.items()
              if path is not None and path.is_file()}
    return {"versions": {**_versions(), "tensorrt": _tensorrt_version()}, "files": hashes}


def build(
    recipe: Recipe, baseline: dict[str, Any], stages: list[dict[str, Any]], sections: dict[str, Any], passed: bool
) -> dict[str, Any]:
    """The report.json document (DESIGN.md): recipe, baseline, stages, export, engine, check."""
    return {
        "recipe": recipe.name,
        "metric": recipe.body.metric.name,
        **({"metric_output": recipe.body.metric.output} if recipe.body.metric.output is not None else {}),
        "passed": passed,
        "baseline": baseline,
        "stages": stages,
        **sections,
        "versions": _versions(),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pruning(stages: list[dict[str, Any]]) -> list[str]:
    """One line per prune stage: what went, and what could not be pruned and why."""
    lines = []
    for i, s in enumerate(stages):
        p = s.get("prune")
        if not p:
            continue
        if p["method"] == "channel":
            line = (f"- {i + 1}. channel ({p['importance']}, {p['scope']}): MACs / {p['macs_reduction']:.2f}, "
                    f"{len(p['steps'])} step(s), {p['resized_modules']} modules resized")
            line += "".join(f"; `{root}` kept ({why})" for root, why in p["skipped"].items())
        else:
            line = f"- {i + 1}. l1_unstructured ({p['scope']}): {p['sparsity']:.1%} of {p['weights']:,} weights are zero"
        lines.append(line)
    return ["", "## Pruning", "", *lines] if lines else []


def _distillation(stages: list[dict[str, Any]]) -> list[str]:
    """One line per fine-tune that distilled: teacher, loss mix, hints, and the last epoch's KD loss."""
    lines = []
    for i, s in enumerate(stages):
        finetunes = [s.get("finetune")] + [step.get("finetune") for step in s.get("prune", {}).get("steps", [])]
        entries = [(s["distill"], s.get("finetune"))] if "distill" in s else []
        entries += [(f["distill"], f) for f in finetunes if f and "distill" in f]
        for d, finetune in entries:
            mix = "label-free" if d["label_free"] else f"alpha {d['alpha']:g}"
            line = f"- {i + 1}. {s['type']}: teacher {d['teacher']}, T {d['temperature']:g}, {mix}"
            line += "".join(f"; hint `{h['student']}`->`{h['teacher']}` ({h['loss']}"
                            + (f", {h['projection']})" if h["projection"] else ")") for h in d["hints"])
            if finetune and finetune.get("history"):
                line += f"; final kd_loss {finetune['history'][-1].get('kd_loss', float('nan')):.4f}"
            if "cache" in d:
                line += f"; teacher cache {d['cache']['megabytes']:.1f} MB"
            lines.append(line)
    return ["", "## Distillation", "", *lines] if lines else []


def _sparsity(stages: list[dict[str, Any]], metric: str) -> list[str]:
    """One line per sparsity stage: coverage, the MACs estimate, magnitude kept, and what stayed dense and why."""
    lines = []
    for i, s in enumerate(stages):
        sp = s.get("sparsity")
        if not sp:
            continue
        est, layers = sp["estimate"], sp["layers"]
        kept = sum(v["retained"] for v in layers.values()) / max(len(layers), 1)
        line = (f"- {i + 1}. {sp['pattern']} on {len(layers)} layers ({est['eligible_macs_share']:.0%} of MACs, "
                f"best case {est['best_case_speedup']:.2f}x); mean |w| kept {kept:.1%}")
        if sp["permute"]:
            before = sum(v.get("retained_unpermuted", v["retained"]) for v in layers.values()) / max(len(layers), 1)
            line += f" ({before:.1%} without permutation)"
        line += f"; {metric} right after masking {_fmt(sp['masked_metric'])}"
        line += "".join(f"; `{name}` dense ({why})" for name, why in sp["skipped"].items())
        if sp.get("permute_reason"):
            line += f"; not permuted: {sp['permute_reason']}"
        lines.append(line)
    return ["", "## Sparsity", "", *lines] if lines else []


def _warnings(stages: list[dict[str, Any]]) -> list[str]:
    """Every stage's warnings (a slower engine after pruning, a MACs overshoot), but calibration's: its section
    lists those beside the layers they name."""
    lines = [f"- {i + 1}. {s['type']}: {w}" for i, s in enumerate(stages) for w in s.get("warnings", [])
             if w not in s.get("calibration", {}).get("warnings", [])]
    return ["", "## Warnings", "", *lines] if lines else []


def _calibration(stages: list[dict[str, Any]], most: int = 3) -> list[str]:
    """One line per calibrated stage (the layers that clip most), then its warnings."""
    lines = []
    for i, s in enumerate(stages):
        cal = s.get("calibration")
        if not cal:
            continue
        clipped = sorted((r for r in cal["layers"] if r["clipped"] > 0), key=lambda r: -r["clipped"])
        listed = ", ".join(f"`{r['name']}` {r['clipped']:.3%} (amax {r['amax']:.4g} of max {r['max']:.4g})"
                           for r in clipped[:most])
        lines.append(f"- {i + 1}. {s['type']}: {cal['method']} on {cal['samples']} samples, {cal['quantizers']} "
                     f"activation quantizers, {len(clipped)} clip" + (f"; most: {listed}" if listed else ""))
        lines += [f"  - WARNING {w}" for w in cal.get("warnings", [])]
        if s.get("attention"):
            a = s["attention"]
            lines.append(f"  - attention: {a['modules']} attention module(s), Q/K/V/out projections INT8; "
                         + ("both attention MatMuls INT8 (Q/DQ on all four inputs)" if a["matmuls"] == "int8"
                            else "attention MatMuls kept float (attention: float)"))
        if s.get("kept_float"):
            kinds = ", ".join(f"{kind} x{n}" for kind, n in s["kept_float"].items())
            lines.append(f"  - kept float by design: {kinds} (no INT8 kernel in TensorRT or ONNX Runtime)")
    return ["", "## Calibration", "", *lines] if lines else []


NOT_MEASURED = "not measured (all-INT8 meets the budget)"


def _fmt_drop(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _budget(stages: list[dict[str, Any]], most: int = 10) -> list[str]:
    """Per stage with an accuracy budget: the outcome on each part, the resolution, the search path and the most
    sensitive units (the largest, when the table was not needed)."""
    lines: list[str] = []
    for i, s in enumerate(stages):
        b = s.get("budget")
        if not b:
            continue
        sens, confirm = b["sensitivity"], b.get("confirm") or {}
        outcome = "met" if b["met"] else f"**not met** ({b['gap']} pt over; the closest step kept)"
        drops = f"drop {b['drop']:.2f} pt on the search part"
        if b.get("confirm_drop") is not None:
            drops += f", {b['confirm_drop']:.2f} pt on the confirm part"
        if b.get("engine_drop") is not None:
            drops += f", {b['engine_drop']:.2f} pt on the engine"
        lines += [f"### {i + 1}. {s['type']}: {b['metric']} within {b['max_drop']} pt of float on data.{b['split']}: "
                  f"{outcome}", "",
                  f"{len(b['float_units'])} unit(s) float, {b['int8_macs_share']:.1%} of MACs INT8; {drops}; "
                  f"{b['passes']} forward passes, {b['seconds']:.1f} s", ""]
        if confirm.get("samples"):
            lines += [f"data.{b['split']} split: {sens['samples']} samples to search (the sensitivity table and the "
                      f"order), {confirm['samples']} held out to confirm ({confirm['share']:g} of the samples, interleaved "
                      f"by position; they chose nothing, a step counts as met only when it meets the budget too"
                      f"{', and the engine on it' if b.get('engine') else ''}). "
                      f"confirm: {confirm['samples']} samples, 1 sample = {confirm['sample_pt']:g} pt.", ""]
        else:
            lines += ["confirm: none (confirm 0): the budget was checked on the samples that chose the units; expect a "
                      "larger drop on unseen data.", ""]
        if confirm.get("warning"):
            lines += [f"WARNING {confirm['warning']}", ""]
        lines += ["| step | units float | metric (search) | drop search (pt) | drop confirm (pt) | engine drop (pt) | "
                  "MACs INT8 | engine ms (x float) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        timed = {t["step"]: t for t in b.get("latency", [])}
        for k, p in enumerate(b["path"]):
            mark = " (kept)" if k == b["kept_step"] else ""
            units = ", ".join(f"`{n}`" for n in p["float_units"][-3:]) or "none"
            more = f"{len(p['float_units']) - 3} more, " if len(p["float_units"]) > 3 else ""
            ms = f"{timed[k]['ms']:.3f} ({timed[k]['speedup']:.2f}x faster)" if k in timed else ""
            lines.append(f"| {k}{mark} | {more}{units} | {p['score']:.4f} | {p['drop']:.2f} | "
                         f"{_fmt_drop(p.get('confirm_drop'))} | {_fmt_drop(p.get('engine_drop'))} | "
                         f"{p['int8_macs_share']:.1%} | {ms} |")
        if timed:
            lines += ["", f"Engine latency: ONNX Runtime (level all), batch {next(iter(timed.values()))['batch_size']}, "
                          "each step timed against the float model's engine, interleaved; \"x float\": the median "
                          "ratio of paired runs."]
        lines += ["", f"![accuracy budget]({BUDGET_PLOT})"]
        total = max(sens["macs"], 1)
        lines += ["", "| unit | kind | MACs | share of MACs | drop alone (pt) | recovery alone (pt) | cosine alone |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        if sens.get("measured", True):
            from compress.ptq.sensitivity import Sensitivity  # torch: only for a report that has a budget

            rows = {r["name"]: r for r in sens["layers"]}  # in the order the search floats them in
            ranked = [rows[r.name] for r in Sensitivity.from_dict(sens).ranked()[:most]]
            lines += [f"| `{r['name']}` | {r['kind']} | {r['macs']:,} | {r['macs'] / total:.1%} | "
                      f"{r['drop_alone']:.2f} | {r['recovery_alone']:.2f} | {r['fidelity_alone']:.4f} |" for r in ranked]
        else:  # the largest units: where float would cost most, had the budget needed any
            largest = sorted(sens["layers"], key=lambda r: -r["macs"])[:most]
            lines += [f"| `{r['name']}` | {r['kind']} | {r['macs']:,} | {r['macs'] / total:.1%} | {NOT_MEASURED} | "
                      f"{NOT_MEASURED} | |" for r in largest]
        lines.append("")
    return ["", "## Accuracy budget", "", *lines] if lines else []


def _not_int8(g: dict[str, Any], most: int) -> str:
    """``INT8 kernels run 88% of the MACs; in float: `conv2` (excluded, 42%), ...`` for a quantized engine."""
    total = g.get("weighted_macs") or 0
    parts = [f"`{f['layer'] or f['node']}` ({f['reason']}"
             + (f", {f['macs'] / total:.0%} of MACs)" if total else ")") for f in g["not_int8"][:most]]
    more = len(g["not_int8"]) - most
    listed = ", ".join(parts) + (f", ... ({more} more)" if more > 0 else "")
    return (f"INT8 kernels run {g['int8_macs_fraction']:.1%} of the weighted-op MACs; "
            + (f"{len(g['not_int8'])} weighted op(s) in float: {listed}" if g["not_int8"] else "no weighted op in float"))


def engine_summary(sections: dict[str, Any]) -> list[str]:
    """The engine's lines for the terminal: the levels it was timed at, what is not INT8, simulated INT8."""
    g = sections.get("engine")
    if not g:
        return []
    lines = []
    if g.get("optimization"):
        o = g["optimization"]
        lines.append(f"engine: {g['path']} saved at optimization {o['file']}; checked at {o['checked']}"
                     + (f", timed at {o['timed']}" if o["timed"] else ""))
    if "not_int8" in g:
        lines.append(f"engine: {_not_int8(g, 3)}")
    if g.get("int8_execution") == "simulated":
        lines.append(f"engine: WARNING {g['int8_note']}")
    if g.get("int8_unplanned"):
        lines.append(f"engine: WARNING {unplanned_note(g['int8_unplanned'])}")
    return lines


def _vs_baseline(g: dict[str, Any]) -> list[str]:
    """The engine against the baseline's FP32 engine (``engine.vs_baseline``), one line."""
    t = g.get("vs_baseline")
    if not t:
        return []
    if "ms" not in t:
        return ["", f"Against the baseline: {t['not_timed']}."]
    ms, speed = t["ms"], t["speedup"]
    structure = (f"; the compressed structure in FP32 runs {ms['float']:.3f} ms ({speed['float']:.2f}x), so INT8 "
                 f"adds {ms['float'] / ms['engine']:.2f}x" if "float" in ms and ms["engine"] > 0 else "")
    return ["", f"Against the baseline's FP32 engine at batch {t['batch_size']} (round-robin, {t['iters']} rounds, "
            f"level {t['level']}): {ms['engine']:.3f} ms vs {ms['baseline']:.3f} ms, **{speed['engine']:.2f}x**"
            f"{structure}; file {t['bytes']['engine'] / 1e6:.2f} MB vs {t['bytes']['baseline'] / 1e6:.2f} MB."]


def unplanned_note(layers: list[str]) -> str:
    """Layers kept in float by the recipe that ONNX Runtime quantized anyway."""
    return (f"{', '.join(f'`{n}`' for n in layers)} kept out of quantization by the recipe, but ONNX Runtime runs "
            "them in INT8 with weight scales of its own, because the tensors around them are quantized for their "
            "neighbours")


def markdown(doc: dict[str, Any]) -> str:
    metric = doc["metric"]
    rows = [("baseline", doc["baseline"], None)] + [
        (f"{i + 1}. {s['type']}", s, s.get("seconds")) for i, s in enumerate(doc["stages"])
    ]
    lines = [
        f"# compress report: {doc['recipe']}",
        "",
        f"Result: **{'passed' if doc['passed'] else 'FAILED'}**",
        "",
        f"| step | {metric} | params | nonzero params | MACs | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry, seconds in rows:
        lines.append(
            f"| {name} | {_fmt(entry['metrics'].get(metric, float('nan')))} | {_fmt(entry['params'])} | "
            f"{_fmt(entry.get('nonzero_params', entry['params']))} | {_fmt(entry['macs'])} | "
            f"{'' if seconds is None else f'{seconds:.1f}'} |"
        )
    lines += _warnings(doc["stages"])
    lines += _pruning(doc["stages"])
    lines += latency_section(doc["stages"])
    lines += _distillation(doc["stages"])
    lines += _sparsity(doc["stages"], metric)
    lines += _calibration(doc["stages"])
    lines += _budget(doc["stages"])
    if "export" in doc:
        e = doc["export"]
        lines += ["", "## Export", "", f"`{e['onnx']}`: opset {e['opset']}, target {e['target']}, "
                  f"{e['nodes']} nodes, {e['qdq_pairs']} Q/DQ pairs"
                  + (f", {e['int8_weights']} int8 weight tensors" if e.get("quantized") else "")]
        sp = e.get("sparsity")
        if sp and (sp["sparse_layers"] or sp.get("expected")):
            lines += ["", f"2:4 sparse weights (after dequantization): {len(sp['sparse_layers'])} layers"
                      + ("".join(f"; `{n}` NOT 2:4" for n in sp.get("missing", [])))]
        rules = e.get("tensorrt_rules")
        if rules is not None:
            verdict = "pass" if rules["passed"] else f"FAIL ({len(rules['violations'])} violations)"
            lines += ["", f"TensorRT Q/DQ rules: {verdict} on {rules['checked_ops']} weighted ops"]
            lines += [f"- {v}" for v in rules["violations"]]
    if "engine" in doc:
        g = doc["engine"]
        lat = ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in g["latency_ms"].items())
        lines += ["", "## Engine", "", f"`{g['path']}` ({g['backend']}): {metric} {_fmt(g['metrics'].get(metric))}"
                  + (f"; p50 latency {lat}" if lat else "")]
        if g.get("optimization"):
            o = g["optimization"]
            lines += ["", f"ONNX Runtime optimization: file saved at `{o['file']}` (portable); accuracy checked at "
                      f"`{o['checked']}`" + (f", latency timed at `{o['timed']}`" if o["timed"] else "")]
        lines += _vs_baseline(g)
        if g.get("int8_ops"):
            ops = ", ".join(f"{k} x{v}" for k, v in g["int8_ops"].items())
            lines += ["", f"INT8 kernels: {ops}; {g['int8_weighted_fraction']:.0%} of weighted ops run in INT8"]
        if "not_int8" in g:
            lines += ["", _not_int8(g, 10)]
            if g["not_int8"]:
                lines += ["", "| layer | node | op | reason | MACs | why |", "|---|---|---|---|---:|---|"]
                lines += [f"| `{f['layer']}` | `{f['node']}` | {f['op']} | {f['reason']} | {f['macs']:,} | {f['detail']} |"
                          for f in g["not_int8"]]
        if g.get("int8_execution") == "simulated":
            lines += ["", f"**Note:** {g['int8_note']}."]
        if g.get("int8_unplanned"):
            lines += ["", f"**Warning:** {unplanned_note(g['int8_unplanned'])}."]
        if g.get("tensorrt"):
            t = g["tensorrt"]
            by = ", ".join(f"{k} {v}" for k, v in t["layers"].get("by_precision", {}).items())
            lines += ["", f"TensorRT {t['tensorrt']}: built in {t['seconds']} s; {t['layers'].get('layers', 0)} engine "
                      f"layers ({by}); sparse kernels on {len(t['layers'].get('sparse_layers', []))} layers; "
                      f"per-layer detail in `{Path(t['layers_json']).name if t.get('layers_json') else '-'}`"]
    if "check" in doc:
        c = doc["check"]
        lines += [
            "",
            "## Check",
            "",
            f"Engine vs {c['reference']}: **{'passed' if c['passed'] else 'FAILED'}** on {c['samples']} samples"
            + (f"; {c['drop_samples']} sample(s) lost net" if c.get("drop_samples") is not None else ""),
            "",
            "| drop (pt) | agreement | cosine | max abs | mean abs |",
            "|---:|---:|---:|---:|---:|",
            f"| {c['drop']:.3f} | {c['agreement']:.4f} | {c['cosine']:.6f} | {c['max_abs']:.3g} | {c['mean_abs']:.3g} |",
        ]
        lines += [f"- {f}" for f in c["failures"]]
        if len(c.get("outputs", {})) > 1:  # every output compared: one row each
            lines += ["", "| output | agreement | cosine | max abs | rel. error |", "|---|---:|---:|---:|---:|"]
            lines += [f"| `{name}`{' (metric)' if name == c.get('output') else ''} | {f['agreement']:.4f} | "
                      f"{f['cosine']:.6f} | {f['max_abs']:.3g} | {f['rel_error']:.3g} |" for name, f in c["outputs"].items()]
        lines += [""] if any(k in c for k in ("onnx_vs_model", "engine_vs_onnx")) else []
        for key, label in (("onnx_vs_model", "ONNX (Q/DQ as written) vs model"), ("engine_vs_onnx", "engine vs ONNX")):
            if key in c:
                f = c[key]
                lines.append(f"- {label}: agreement {f['agreement']:.4f}, cosine {f['cosine']:.6f}, max abs {f['max_abs']:.3g}")
    lines += ["", f"![{metric} vs engine latency and size]({PLOT_NAME})", ""]
    return "\n".join(lines)


_QUANT_STAGES = ("ptq", "qat")
SHARES = ("top1", "agreement", "cosine", "miou", "pixel_accuracy")  # metrics at most 1


def _padded(ax: Any, values: list[float], bounded: bool) -> None:
    """A y range a person can read: the points' span plus 15 % each side, and at least 1 % of the top value
    (a 0.994-1.0 axis makes one sample look like a cliff)."""
    finite = [v for v in values if v == v]
    if not finite:
        return
    low, high = min(finite), max(finite)
    pad = max(0.15 * (high - low), 0.01 * max(abs(high), 1e-9) / 2)
    top = high + pad
    if bounded and high <= 1.0:  # a share: nothing lies above 1
        top = min(top, 1.0 + 0.1 * pad)
    ax.set_ylim(low - pad, top)


def _weight_bytes(step: dict[str, Any], quantized: bool) -> float:
    """A step's weights at the precision they deploy in (``weight_bytes``; reports written before it existed:
    4 bytes a parameter in float, 1 once INT8)."""
    return step.get("weight_bytes", step["params"] * (1 if quantized else 4))


def plot(doc: dict[str, Any], path: Path) -> None:
    """The trade-off a user decides on, two panels sharing the metric axis.

    Left: metric against engine latency at one batch size (``engine.vs_baseline``, timed round-robin in the
    deployed session): the baseline's FP32 engine and the deployed engine (its INT8 share of MACs and speedup
    written beside it); a dotted line marks the compressed structure in FP32, i.e. what pruning alone bought.
    Right: metric against weight size at deployed precision for the baseline, every stage and the engine file,
    numbered (the legend names the steps), float and INT8 steps in different markers.
    """
    # A bare Figure with the Agg canvas: no pyplot, so the caller's matplotlib backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = doc["metric"]
    score = lambda step: step.get("metrics", {}).get(metric, float("nan"))  # noqa: E731
    fig = Figure(figsize=(11, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2, sharey=None)
    engine = doc.get("engine") or {}
    ys: list[float] = [score(doc["baseline"])]

    timed = engine.get("vs_baseline") or {}
    if "ms" in timed:
        ms, base_y, eng_y = timed["ms"], score(doc["baseline"]), score(engine)
        ys.append(eng_y)
        left.plot([ms["baseline"]], [base_y], "o", color="tab:gray", ms=8, label="baseline, FP32 engine")
        share = engine.get("int8_macs_fraction")
        label = "deployed engine" + (f" (INT8 on {share:.0%} of MACs)" if share is not None else "")
        left.plot([ms["engine"]], [eng_y], "*", color="tab:green", ms=14, label=label)
        speedup = timed["speedup"]["engine"]
        left.annotate(f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x SLOWER", (ms["engine"], eng_y),
                      textcoords="offset points", xytext=(8, -4), fontsize=8)
        if "float" in ms:
            left.axvline(ms["float"], color="tab:blue", ls=":", lw=1.2,
                         label=f"compressed structure in FP32 ({timed['speedup']['float']:.2f}x)")
        left.set_xlim(0, 1.15 * max(ms.values()))
        left.set_xlabel(f"engine latency, batch {timed['batch_size']} ({engine.get('backend', 'onnxruntime')}, "
                        f"level {timed['level']}) [ms]")
        left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)  # hides no point
    else:
        why = timed.get("not_timed") or ("no engine was built" if not engine else "the engine was not timed "
                                         "(bench_iters: 0, or a TensorRT engine)")
        left.text(0.5, 0.5, f"latency not measured:\n{why}", ha="center", va="center", fontsize=8, wrap=True,
                  transform=left.transAxes)
        left.set_xlabel("engine latency [ms]")
    left.set_ylabel(metric)
    left.set_title("accuracy vs engine latency", fontsize=10)

    steps = [("baseline", doc["baseline"], False)]
    quantized = False
    for s in doc["stages"]:
        quantized = quantized or s["type"] in _QUANT_STAGES
        if "metrics" in s and "params" in s:
            steps.append((s["type"], s, quantized))
    xs = [_weight_bytes(st, q) / 1e6 for _, st, q in steps]
    step_ys = [score(st) for _, st, _ in steps]
    ys += step_ys
    right.plot(xs, step_ys, "-", color="tab:blue", lw=1, alpha=0.5)
    for k, ((_, _, q), x, y) in enumerate(zip(steps, xs, step_ys, strict=True)):
        right.plot([x], [y], "s" if q else "o", color="tab:orange" if q else "tab:blue", ms=7)
        right.annotate(str(k), (x, y), textcoords="offset points", xytext=(5, 5 if k % 2 else -11), fontsize=8)
    if "bytes" in timed:
        size = timed["bytes"]["engine"] / 1e6
        right.plot([size], [score(engine)], "*", color="tab:green", ms=14)
        xs.append(size)
    names = ", ".join(f"{k} {name}" for k, (name, _, _) in enumerate(steps))
    star = "; star: engine file" if "bytes" in timed else ""
    right.set_title(f"accuracy vs size ({names}{star})", fontsize=8, wrap=True)
    right.set_xlabel("weights at deployed precision [MB] (INT8: 1 B each)")
    right.set_xlim(0, 1.1 * max(xs))
    for ax in (left, right):
        _padded(ax, ys, bounded=metric in SHARES)
        ax.grid(alpha=0.3)
    fig.suptitle(doc["recipe"], fontsize=10)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_budget(doc: dict[str, Any], path: Path) -> bool:
    """For the first stage with an accuracy budget: each unit's recovery alone against its share of the MACs (only
    when the table was measured: an all-INT8 model that met the budget needs none, and the figure then has the path
    panel alone), and the search path (the drop on each part, and the engine's, against engine latency where timed,
    else against the share of MACs still INT8). Returns whether there was one to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    budget = next((s["budget"] for s in doc["stages"] if s.get("budget")), None)
    if budget is None:
        return False
    sens, path_steps = budget["sensitivity"], budget["path"]
    measured = sens.get("measured", True)
    fig = Figure(figsize=(10 if measured else 5.5, 4), dpi=100)
    FigureCanvasAgg(fig)
    if measured:
        left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        _sensitivity_panel(left, sens)
        axes = (left, right)
    else:
        right = fig.add_subplot(1, 1, 1)
        axes = (right,)
    timed = {t["step"]: t for t in budget.get("latency", [])}
    if timed:
        xs = [timed[k]["ms"] for k in range(len(path_steps))]
        right.set_xlabel(f"engine latency, batch {next(iter(timed.values()))['batch_size']} (ms)")
        right.axvline(next(iter(timed.values()))["float_ms"], color="gray", ls=":", lw=1, label="float engine")
    else:
        xs = [100 * p["int8_macs_share"] for p in path_steps]
        right.set_xlabel("MACs still INT8 (%)")
    right.plot(xs, [p["drop"] for p in path_steps], "o-", color="tab:blue", label="fake-quant drop, search part")
    confirm = [(x, p["confirm_drop"]) for x, p in zip(xs, path_steps, strict=True) if p.get("confirm_drop") is not None]
    if confirm:
        right.plot(*zip(*confirm, strict=True), "^--", color="tab:orange", label="fake-quant drop, confirm part")
    engine = [(x, p["engine_drop"]) for x, p in zip(xs, path_steps, strict=True) if p.get("engine_drop") is not None]
    if engine:
        right.plot(*zip(*engine, strict=True), "s", color="tab:green", label="engine drop (confirm part)")
    for k, x in enumerate(xs):
        right.annotate(f"{k}{' kept' if k == budget['kept_step'] else ''}", (x, path_steps[k]["drop"]),
                       textcoords="offset points", xytext=(3, 3), fontsize=7)
    right.axhline(budget["max_drop"], color="tab:red", ls="--", lw=1, label=f"budget {budget['max_drop']} pt")
    right.set_ylabel(f"{budget['metric']} drop vs float (pt)")
    right.set_title("search path (step: units float)" if measured else
                    "all-INT8 meets the budget: no sensitivity table needed")
    right.legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def _sensitivity_panel(ax: Any, sens: dict[str, Any]) -> None:
    """Each unit's recovery alone against its share of the MACs, the units that matter named."""
    rows = sens["layers"]
    total = max(sens["macs"], 1)
    ax.scatter([100 * r["macs"] / total for r in rows], [r["recovery_alone"] for r in rows], s=14, color="tab:blue")
    top = max((r["recovery_alone"] for r in rows), default=0.0)
    # names only for the units that matter (a quarter of the largest recovery or more): labels of the many units
    # near zero would print over each other
    for r in [r for r in sorted(rows, key=lambda r: -r["recovery_alone"]) if top > 0 and r["recovery_alone"] >= top / 4][:5]:
        ax.annotate(r["name"], (100 * r["macs"] / total, r["recovery_alone"]), textcoords="offset points",
                    xytext=(3, 3), fontsize=7)
    ax.set_xlabel("share of the model's MACs (%)")
    ax.set_ylabel(f"{sens['metric']} recovered when alone float (pt)")
    ax.set_title("sensitivity per unit")


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PLOTS_MISSING = "plots skipped: matplotlib is not installed (pip install 'compress[plots]')"


def write(run_dir: Path, doc: dict[str, Any]) -> None:
    """Write report.json, report.md and the plots, each atomically. matplotlib is an extra: without it the
    report is written all the same, with a note in place of each picture."""
    io.write_json(run_dir / "report.json", doc)
    text = markdown(doc)
    if _have_matplotlib():
        plot(doc, run_dir / PLOT_NAME)
        plot_budget(doc, run_dir / BUDGET_PLOT)
        plot_latency(doc, run_dir / LATENCY_PLOT)
    else:
        logging.getLogger("compress").warning("report: %s", PLOTS_MISSING)
        text = "\n".join(f"_{PLOTS_MISSING}._" if line.startswith("![") and line.endswith((f"({PLOT_NAME})",
                          f"({BUDGET_PLOT})", f"({LATENCY_PLOT})")) else line for line in text.split("\n"))
    io.write_text(run_dir / "report.md", text)
