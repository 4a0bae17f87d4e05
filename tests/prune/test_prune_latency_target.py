"""Pruning to a latency target measured on the engine: the search, its cost, the engine path, bad input.

The search logic is tested with a deterministic timer (latency a fixed function of the candidate's MACs), so
those tests assert exact outcomes; tests that time real engines assert structure and the met rule only,
since the machine's load moves every figure.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers_recipes import read_report, recipe_text, stage_recipe
from torch import nn

import compress
from compress.errors import CompressError
from compress.export.tensorrt import why_unavailable
from compress.profile import count_macs, count_params
from compress.prune import ChannelOptions, ChannelPruner, LatencyTarget
from compress.prune.latency_search import Probe, Timing, first_ratio, search
from compress.prune.latency_target import Backend, engine_multiple, ort_block_size
from compress.prune.stage import _warnings


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def _digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return compress.build("compress.zoo:digits_cnn", {"width": 128}).eval()


def _pruner(round_to: int = 1) -> ChannelPruner:
    """The search logic on a small real model: 128- and 256-channel conv groups, so round_to 1 gives fine steps."""
    return ChannelPruner(_digits_cnn(), torch.randn(2, 1, 8, 8), ChannelOptions(round_to=round_to))


def _build(pruner: ChannelPruner):  # noqa: ANN202
    def build(ratio: float) -> Probe | None:
        model = pruner.pruned_copy(ratio)
        return None if model is None else Probe(model, count_macs(model, pruner.example), count_params(model))
    return build


def _timer(pruner: ChannelPruner, floor: float, spread: float = 0.0):  # noqa: ANN202
    """Latency ratio = floor + (1 - floor) * MACs share: a fixed overhead no pruning removes. Five runs at
    ratio -/+ spread and -/+ spread/2 around it: quartiles (inclusive) at -/+ spread/2, so the IQR is ``spread``."""
    def time(model: nn.Module) -> Timing:
        q = floor + (1 - floor) * count_macs(model, pruner.example) / pruner.macs_before
        return Timing.from_runs([q - spread, q - spread / 2, q, q + spread / 2, q + spread], ms=q * 10,
                                unpruned_ms=10.0)
    return time


@pytest.mark.parametrize("candidates", [1, 3, 5])
def test_the_search_times_exactly_the_candidates_it_is_given_and_meets_a_reachable_target(candidates) -> None:
    pruner = _pruner()
    found = search(_build(pruner), _timer(pruner, floor=0.1), 0.5, candidates, pruner.macs_before,
                   count_params(pruner.model))
    assert len(found.candidates) == candidates and found.stopped is None
    assert len({c.macs for c in found.candidates}) == candidates  # each with channel counts of its own
    assert found.candidates[0].ratio == pytest.approx(first_ratio(0.5)) == pytest.approx(1 - math.sqrt(0.5))
    assert pruner.macs_before == count_macs(pruner.model, pruner.example)  # candidates are copies
    if candidates > 1:  # latency ~ MACs overestimates the gain of the first guess at a 10% floor: then bracketed
        assert found.met and found.chosen.timing.ratio <= 0.5
        below = [c for c in found.candidates if c.timing.ratio <= 0.5]
        assert found.chosen == min(below, key=lambda c: c.ratio)  # the least pruned of those that meet it


def test_the_search_closes_in_on_the_target_from_below() -> None:
    pruner = _pruner()
    found = search(_build(pruner), _timer(pruner, floor=0.3), 0.5, 6, pruner.macs_before, 0)
    ratios = [c.timing.ratio for c in found.candidates]
    # the first guess (latency ~ MACs) prunes too little at a 30% floor; then it extrapolates and brackets
    assert ratios[0] > 0.5 and min(ratios) <= 0.5
    assert found.met and 0.5 - 0.02 < found.chosen.timing.ratio <= 0.5  # within 2% of the target, from below


def test_a_result_within_the_measured_noise_counts_as_met_and_one_beyond_it_does_not() -> None:
    pruner = _pruner()
    # a 60% floor: ratio 0.5 needs MACs x0 — out of reach; the fastest candidate is kept, how close is said
    found = search(_build(pruner), _timer(pruner, floor=0.6, spread=0.0), 0.5, 4, pruner.macs_before, 0)
    chosen = found.chosen
    assert not found.met and chosen == min(found.candidates, key=lambda c: c.timing.ratio)
    gap = found.to_report()["gap"]
    assert gap > 0 and gap == pytest.approx(chosen.timing.ratio - 0.5, abs=1e-4)
    wide = search(_build(pruner), _timer(pruner, floor=0.6, spread=0.2), 0.5, 4, pruner.macs_before, 0)
    # an IQR 0.2 wide: noise 0.1, so a median within 0.1 above the target is met
    assert wide.chosen.timing.noise == pytest.approx(0.1)
    assert wide.met == (wide.chosen.timing.ratio <= 0.6)
    report = found.to_report()
    line = _warnings({"macs_reduction": 2.0, "round_to": 1, "latency": report},
                     compress.prune.stage.PruneConfig(method="channel", latency={"target": 0.5}), [])
    assert line[-1].startswith(f"latency target 0.5 not met: the closest candidate ({chosen.index}) runs at "
                               f"x{report['latency_ratio']:.3f} of the unpruned engine")


def test_a_target_met_far_past_through_a_coarse_step_says_so() -> None:
    path = [{"candidate": 0, "latency_ratio": 0.675, "macs_reduction": 1.73},
            {"candidate": 1, "latency_ratio": 0.332, "macs_reduction": 3.83}]
    search = {"target": 0.5, "met": True, "chosen": 1, "latency_ratio": 0.332, "macs_reduction": 3.83,
              "engine": {"round_to": 16}, "path": path}
    config = compress.prune.stage.PruneConfig(method="channel", latency={"target": 0.5})
    (line,) = _warnings({"macs_reduction": 3.83, "round_to": 16, "latency": search}, config, [])
    assert line == ("latency target 0.5: the chosen candidate runs at x0.332, well past the target (MACs / 3.83); the "
                    "closest less pruned one ran x0.675 (MACs / 1.73): channel steps are coarse here (round_to: 16); "
                    "scope: global gives finer ones")
    near = search | {"chosen": 0, "latency_ratio": 0.45, "path": [path[0], path[1] | {"latency_ratio": 0.45}]}
    assert _warnings({"macs_reduction": 3.83, "round_to": 16, "latency": near}, config, []) == []  # within 0.8x


def test_an_unreachable_target_stops_at_the_most_pruning_and_keeps_the_closest() -> None:
    pruner = _pruner(round_to=16)
    found = search(_build(pruner), _timer(pruner, floor=0.7), 0.5, 8, pruner.macs_before, 0)
    assert not found.met and 1 <= len(found.candidates) <= 8
    assert found.stopped is not None  # the most pruning possible timed, or the same channel counts proposed again
    assert found.chosen.timing.ratio == min(c.timing.ratio for c in found.candidates) > 0.5
    assert len({c.macs for c in found.candidates}) == len(found.candidates)  # never the same channel counts twice


def test_channel_multiples_follow_the_engine() -> None:
    assert ort_block_size({"avx2", "avx512f"}) == 16 and ort_block_size({"avx2"}) == 8
    assert engine_multiple(Backend.tensorrt, int8=False) == 8 and engine_multiple(Backend.tensorrt, int8=True) == 32
    assert engine_multiple(Backend.onnxruntime, int8=True) == ort_block_size()


@pytest.mark.slow
def test_the_api_prunes_to_a_measured_latency_on_onnx_runtime(tmp_path) -> None:
    model, x = _resnet(), torch.randn(2, 3, 32, 32)
    macs0 = count_macs(model, x)
    found = compress.prune.channels(model, x, latency=LatencyTarget(target=0.6, candidates=3, repeats=3, rounds=3),
                                    workdir=tmp_path)
    assert found.model is model and len(found.candidates) + (found.stopped is not None) >= 1
    report = found.to_report()
    assert report["engine"] | {"round_to": ort_block_size()} == report["engine"]  # default round_to: MLAS's block
    assert report["engine"]["backend"] == "onnxruntime" and report["engine"]["optimization"] == "all"
    assert report["engine"]["precision"] == "fp32"
    for c in report["path"]:
        assert len(c["runs"]) == 3 and c["spread"][0] <= c["latency_ratio"] <= c["spread"][1]
        assert c["ms"] > 0 and c["unpruned_ms"] > 0 and c["macs"] < macs0
    chosen = found.chosen
    assert count_macs(model, x) == chosen.macs  # the model is the chosen candidate
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c % ort_block_size() == 0 for c in convs)
    # reachable (resnet18 at half its channels runs in about a third of the time), and met by the stated rule:
    # the median within half the runs' IQR of the target, however loaded the machine
    assert found.met and chosen.timing.ratio <= 0.6 + chosen.timing.noise
    assert not list(tmp_path.iterdir())  # the candidates' files are gone


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"latency": 1.5}, "prune.channels.latency.target: Input should be less than 1"),
        ({"latency": 0.0}, "prune.channels.latency.target: Input should be greater than 0"),
        ({"latency": {"target": 0.5, "candidats": 3}}, "prune.channels.latency: unknown key 'candidats'; did you mean 'candidates'?"),
        ({"latency": 0.5, "ratio": 0.3}, "prune.channels.latency: cannot be combined with ratio"),
        ({"latency": 0.5, "macs_reduction": 2.0}, "prune.channels.latency: cannot be combined with macs_reduction"),
    ],
    ids=["above-1", "zero", "unknown-key", "with-ratio", "with-macs"],
)
def test_bad_latency_options_in_the_api_are_one_line_errors(kwargs, expected) -> None:
    with pytest.raises(CompressError) as info:
        compress.prune.channels(_resnet(), torch.randn(2, 3, 32, 32), **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(why_unavailable() is None, reason="TensorRT and a GPU are present here")
def test_tensorrt_where_it_cannot_run_names_what_is_missing() -> None:
    with pytest.raises(CompressError, match=r"prune.channels.latency.backend: tensorrt cannot run here: "):
        compress.prune.channels(_resnet(), torch.randn(2, 3, 32, 32), latency={"target": 0.5, "backend": "tensorrt"})


def _recipe(write_recipe, checkpoint, stage: str, export: bool = False):  # noqa: ANN202
    return stage_recipe(write_recipe, checkpoint, f"  - prune: {stage}\n", target="onnxruntime" if export else None)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("{method: channel, latency: {target: 1.5}}", "stages.0.prune.latency.target: Input should be less than 1"),
        ("{method: channel, latency: {target: 0}}", "stages.0.prune.latency.target: Input should be greater than 0"),
        ("{method: channel, ratio: 0.3, latency: {target: 0.5}}", "latency cannot be combined with ratio"),
        ("{method: channel, macs_reduction: 2, latency: {target: 0.5}}", "latency cannot be combined with macs_reduction"),
        ("{method: l1_unstructured, ratio: 0.5, latency: {target: 0.5}}",
         "'latency' does not apply to method l1_unstructured"),
        ("{method: channel, latency: {target: 0.5}, latency_check: false}", "latency_check has no effect with latency"),
    ],
    ids=["above-1", "zero", "with-ratio", "with-macs", "l1", "latency-check"],
)
def test_bad_latency_stages_fail_validate_in_one_line(stage, expected, write_recipe, cli, digits_cnn_checkpoint) -> None:
    result = cli("validate", _recipe(write_recipe, digits_cnn_checkpoint, stage))
    assert result.code == 2 and expected in result.error_line()


@pytest.mark.skipif(why_unavailable() is None, reason="TensorRT and a GPU are present here")
def test_a_tensorrt_latency_target_without_tensorrt_fails_validate_naming_what_is_missing(write_recipe, cli,
                                                                                         digits_cnn_checkpoint) -> None:
    stage = "{method: channel, latency: {target: 0.5, backend: tensorrt}}"
    result = cli("validate", _recipe(write_recipe, digits_cnn_checkpoint, stage))
    assert result.code == 2
    assert "stages.0.prune.latency.backend: tensorrt cannot run here: " in result.error_line()
    assert why_unavailable() in result.error_line()


def test_validate_plans_int8_timing_when_a_later_stage_quantizes(write_recipe, cli, digits_cnn_checkpoint) -> None:
    stages = "{method: channel, latency: {target: 0.5}}\n  - ptq: {limit: 64}"
    result = cli("validate", _recipe(write_recipe, digits_cnn_checkpoint, stages, export=True))
    assert result.code == 0, result.err
    assert "latency target 0.5 at batch 8 on onnxruntime (INT8 (calibrated copies" in result.out
    assert f"round_to {ort_block_size()} (default)" in result.out
    plain = cli("validate", _recipe(write_recipe, digits_cnn_checkpoint, "{method: channel, latency: {target: 0.5}}"))
    assert "on onnxruntime (fp32)" in plain.out


RESNET_RECIPE = """\
name: latency-target
model: {{factory: "torchvision.models:resnet18", kwargs: {{num_classes: 10}}}}
data:
  calibration: {{source: digits, split: train, size: 32, channels: 3, limit: 64, batch_size: 32}}
  eval: {{source: digits, split: test, size: 32, channels: 3, limit: 64, batch_size: 32}}
metric: agreement
stages:
  - prune: {{method: channel, latency: {{target: 0.6, candidates: 3, repeats: 3, rounds: 3}}, finetune: {{epochs: 0}}}}
{ptq}  - export:
      onnx: {{target: onnxruntime}}
      engine: {{batch_sizes: [1], bench_iters: 2}}
      check: {{max_drop: 100, min_agreement: 0}}
"""


@pytest.mark.slow
def test_a_recipe_prunes_resnet18_to_a_latency_target_on_int8_engines_and_reports_the_search(write_recipe, cli,
                                                                                           tmp_path) -> None:
    """A ptq stage follows: candidates are timed as INT8 engines (the FP32 path: the API test above)."""
    ptq = True
    recipe = write_recipe(RESNET_RECIPE.format(ptq="  - ptq: {limit: 64}\n"))
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out, "--quiet").code == 0
    report = read_report(out)
    entry = report["stages"][0]
    search = entry["prune"]["latency"]
    assert search["candidates"] == 3 and 1 <= search["timed"] == len(search["path"]) <= 3
    engine = search["engine"]
    assert engine["precision"] == ("int8" if ptq else "fp32")
    assert engine["int8_target"] == ("onnxruntime" if ptq else None)  # the ptq stage's target, from the export
    chosen = next(c for c in search["path"] if c["candidate"] == search["chosen"])
    assert entry["macs"] == chosen["macs"] and entry["prune"]["round_to"] == ort_block_size()
    assert search["met"] == (chosen["latency_ratio"] <= 0.6 + (chosen["iqr"][1] - chosen["iqr"][0]) / 2)
    md = (out / "report.md").read_text()
    assert "## Latency target" in md and "| candidate | ratio | MACs |" in md
    assert (out / "report_latency.png").stat().st_size > 1000
    assert not list((out / "stages" / "01-prune").glob("latency-search-*"))  # the candidates' files are gone


STEPS_STAGES = """\
  - prune: {method: channel, scope: global, steps: 2, finetune: {epochs: 1},
            latency: {target: 0.6, candidates: 2, repeats: 2, rounds: 2}}
  - export:
      onnx: {target: onnxruntime, opset: 17}
      engine: {batch_sizes: [1], bench_iters: 2}
      check: {max_drop: 100, min_agreement: 0}
"""


@pytest.mark.slow
def test_a_latency_target_in_steps_times_the_model_it_leaves_at_the_export_opset(write_recipe, cli, tmp_path,
                                                                                digits_cnn_checkpoint) -> None:
    """Fine-tuning between global-scope steps may move channels between layers: the model left is timed again."""
    out = tmp_path / "run"
    result = cli("run", write_recipe(recipe_text(digits_cnn_checkpoint, STEPS_STAGES)), "--out", out, "--quiet")
    assert result.code == 0, result.err
    entry = read_report(out)["stages"][0]
    search = entry["prune"]["latency"]
    assert search["engine"]["opset"] == 17  # candidates exported as the export stage will export the model
    final = search["final"]
    assert final["macs"] == entry["macs"]  # the model the stage left, not a candidate
    assert len(final["runs"]) == 2 and final["spread"][0] <= final["latency_ratio"] <= final["spread"][1]
    assert final["met"] == (final["latency_ratio"] <= 0.6 + (final["iqr"][1] - final["iqr"][0]) / 2)
    assert "The model left after the stage's steps, timed again: MACs / " in (out / "report.md").read_text()
