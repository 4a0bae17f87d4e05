"""report.md's section and plot for prune stages that searched a latency target (``prune.latency``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress import io

LATENCY_PLOT = "report_latency.png"  # written when a prune stage searched a latency target


def _searches(stages: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(i, s["prune"]["latency"]) for i, s in enumerate(stages) if s.get("prune", {}).get("latency")]


def latency_section(stages: list[dict[str, Any]]) -> list[str]:
    """Per prune stage with a latency target: the engine, the outcome, and the search path as a table."""
    lines: list[str] = []
    for i, search in _searches(stages):
        e = search["engine"]
        where = (f"{e['backend']}" + (f" (optimization {e['optimization']}, threads {e['threads'] or 'default'})"
                                     if e.get("optimization") else "") + f", {e['precision']}")
        if e.get("int8_target"):
            where += f" (a later stage quantizes: INT8 engines of copies calibrated with {e['int8_calibration']})"
        chosen = search["chosen"]
        if search["met"]:
            outcome = "met"
        else:
            outcome = (f"**not met**: the closest candidate ({chosen}) runs at x{search['latency_ratio']:.3f}, "
                       f"{search['gap']:+.3f} from the target; it is kept")
        lines += [f"### {i + 1}. prune: latency x{search['target']:g} of the unpruned engine: {outcome}", "",
                  f"Engine: {where}; batch {e['batch_size']}, round_to {e['round_to']}. Each candidate timed in "
                  f"{e['repeats']} runs of {e['rounds']} rounds interleaved with the unpruned engine; a run's ratio is "
                  f"the median of its paired rounds. Met: {e['met_rule']}. {search['timed']} of "
                  f"{search['candidates']} candidates timed in {search['seconds']:.1f} s"
                  + (f" (stopped: {search['stopped']})" if search["stopped"] else "") + ".", "",
                  f"Chosen: candidate {chosen}, ratio {search['ratio']}: MACs / {search['macs_reduction']:.2f}, "
                  f"latency x{search['latency_ratio']:.3f} (runs {search['spread'][0]:.3f}-{search['spread'][1]:.3f}).",
                  "", "| candidate | ratio | MACs | params | MACs reduction | latency ratio | runs min-max | IQR | ms "
                  "| unpruned ms |", "|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
        for c in search["path"]:
            mark = " (chosen)" if c["candidate"] == chosen else ""
            lines.append(f"| {c['candidate']}{mark} | {c['ratio']:.4f} | {c['macs']:,} | {c['params']:,} | "
                         f"{c['macs_reduction']:.2f}x | {c['latency_ratio']:.3f} | {c['spread'][0]:.3f}-"
                         f"{c['spread'][1]:.3f} | {c['iqr'][0]:.3f}-{c['iqr'][1]:.3f} | {c['ms']:.3f} | "
                         f"{c['unpruned_ms']:.3f} |")
        final = search.get("final")
        if final is not None:
            lines += ["", f"The model left after the stage's steps, timed again: MACs / {final['macs_reduction']:.2f}, "
                          f"latency x{final['latency_ratio']:.3f} (runs {final['spread'][0]:.3f}-"
                          f"{final['spread'][1]:.3f}): {'meets' if final['met'] else '**does not meet**'} the target."]
        lines += ["", f"![latency vs MACs]({LATENCY_PLOT})", ""]
    return ["", "## Latency target", "", *lines] if lines else []


def plot_latency(doc: dict[str, Any], path: Path) -> bool:
    """For the first prune stage with a latency target: each candidate's measured latency ratio (IQR and
    min-max of its runs as bars) against its MACs, the unpruned model at (MACs, 1), the target as a line.
    Returns whether there was one to draw."""
    # A bare Figure with the Agg canvas: no pyplot, so the caller's matplotlib backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    found = _searches(doc["stages"])
    if not found:
        return False
    index, search = found[0]
    path_rows = search["path"]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    macs = [c["macs"] / 1e6 for c in path_rows]
    ratio = [c["latency_ratio"] for c in path_rows]
    ax.errorbar(macs, ratio, yerr=[[r - c["spread"][0] for r, c in zip(ratio, path_rows, strict=True)],
                                   [c["spread"][1] - r for r, c in zip(ratio, path_rows, strict=True)]],
                fmt="none", ecolor="lightgray", elinewidth=1, capsize=2)
    ax.errorbar(macs, ratio, yerr=[[r - c["iqr"][0] for r, c in zip(ratio, path_rows, strict=True)],
                                   [c["iqr"][1] - r for r, c in zip(ratio, path_rows, strict=True)]],
                fmt="o", color="tab:blue", elinewidth=2, capsize=3, label="candidates (IQR; min-max in gray)")
    for c, x, y in zip(path_rows, macs, ratio, strict=True):
        ax.annotate(str(c["candidate"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    chosen = next((c for c in path_rows if c["candidate"] == search["chosen"]), None)
    if chosen is not None:
        ax.plot([chosen["macs"] / 1e6], [chosen["latency_ratio"]], "*", color="tab:green", markersize=14,
                label="chosen")
    ax.plot([search["macs_before"] / 1e6], [1.0], "s", color="black", label="unpruned")
    ax.axhline(search["target"], color="tab:red", ls="--", lw=1, label=f"target x{search['target']:g}")
    e = search["engine"]
    ax.set_xlabel("MACs (millions, per sample)")
    ax.set_ylabel(f"engine latency / unpruned (batch {e['batch_size']})")
    ax.set_title(f"{index + 1}. prune: {e['backend']} {e['precision']}, {search['timed']} candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True
