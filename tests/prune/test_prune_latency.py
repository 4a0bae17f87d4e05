"""Pruning that makes the engine slower is never silent: default round_to, engine latency, overshoot, slowdowns."""

from __future__ import annotations

import pytest
import torch
from helpers_recipes import read_report, stage_recipe
from helpers_unexportable import triu_digits
from torch import nn

import compress
from compress.profile import count_macs
from compress.prune import latency
from compress.prune.channel import DEFAULT_ROUND_TO, overshoot
from compress.prune.latency import EngineLatency, slowdown_warnings


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _digits_cnn() -> nn.Module:
    torch.manual_seed(0)
    return compress.build("compress.zoo:digits_cnn", {}).eval()


def test_default_round_to_keeps_multiples_of_8_and_round_to_1_does_not() -> None:
    x = torch.randn(2, 1, 8, 8)
    # ratio 0.3 keeps 32 - floor(9.6) = 23 and 64 - floor(19.2) = 45 channels: counts that depend on no weight
    exact = compress.prune.channels(_digits_cnn(), x, ratio=0.3, round_to=1)
    assert _widths(exact) == [23, 23, 23, 45, 45, 45]
    rounded = compress.prune.channels(_digits_cnn(), x, ratio=0.3)  # default: rounded up to multiples of 8
    assert DEFAULT_ROUND_TO == 8 and _widths(rounded) == [24, 24, 24, 48, 48, 48]


def test_macs_target_bisection_converges_with_the_default_rounding() -> None:
    model, x = _digits_cnn(), torch.randn(2, 1, 8, 8)
    macs0 = count_macs(model, x)
    compress.prune.channels(model, x, macs_reduction=2.0, scope="global")
    widths = _widths(model)
    assert all(w % 8 == 0 and w > 0 for w in widths), widths
    assert 2.0 <= macs0 / count_macs(model, x) < 2.2  # global ranking leaves steps fine enough for 2x


def test_a_macs_target_landing_far_past_the_request_says_so() -> None:
    # local scope moves every layer together: 24/40 channels is short of 2x, the next step (16/32) is 3.96x
    model, x = _digits_cnn(), torch.randn(2, 1, 8, 8)
    macs0 = count_macs(model, x)
    with pytest.warns(UserWarning, match=r"prune.channels: macs_reduction: asked 2x, got 3\.96x .*round_to: 8"):
        compress.prune.channels(model, x, macs_reduction=2.0)
    assert macs0 / count_macs(model, x) == pytest.approx(3.96, abs=0.005)
    assert overshoot(2.0, 2.43, 8).startswith("macs_reduction: asked 2x, got 2.43x")
    assert overshoot(2.0, 2.2, 8) is None and overshoot(2.0, 2.21, 1) is not None  # the limit is 1.1x


def test_slowdown_warnings_follow_the_measured_figures() -> None:
    figures = [EngineLatency(1, before=1.25, after=4.25, iters=100), EngineLatency(8, before=4.0, after=4.1, iters=50),
               EngineLatency(32, before=9.0, after=4.5, iters=20)]
    lines = slowdown_warnings(figures, round_to=1)
    assert lines == ["pruning made the engine slower: ONNX Runtime (all) batch 1 runs 4.250 ms vs 1.250 ms unpruned "
                     "(0.29x); channel counts that are not multiples of 8 (round_to: 1) are a likely cause"]
    assert slowdown_warnings(figures[1:], round_to=1) == []  # 0.976x is within noise; 2x faster is no warning
    assert "likely cause" not in slowdown_warnings(figures, round_to=16)[0]
    # Paired rounds: a slow median that came from a few loaded rounds (pruned slower in 40 % of them) is noise.
    noisy = EngineLatency(1, before=0.05, after=0.08, iters=100, paired_speedup=0.6, slower_share=0.4)
    steady = EngineLatency(1, before=0.05, after=0.08, iters=100, paired_speedup=0.6, slower_share=0.9)
    assert slowdown_warnings([noisy], round_to=8) == [] and len(slowdown_warnings([steady], round_to=8)) == 1


def test_prune_stage_reports_engine_latency_round_to_and_the_overshoot(write_recipe, cli, digits_cnn_checkpoint,
                                                                       tmp_path) -> None:
    stage = ("  - prune: {method: channel, macs_reduction: 2.0, finetune: {epochs: 0},\n"
             "            latency_check: {batch_sizes: [1, 4], seconds: 0.5}}\n")
    recipe = stage_recipe(write_recipe, digits_cnn_checkpoint, stage, target=None)
    validated = cli("validate", recipe)
    assert validated.code == 0 and "dry run: MACs / 3.96, round_to 8 (default); macs_reduction: asked 2x" in validated.out
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out, "--quiet")
    assert result.code == 0, result.err
    entry = read_report(out)["stages"][0]
    info = entry["prune"]
    assert info["round_to"] == 8 and info["round_to_default"] is True and info["macs_reduction_requested"] == 2.0
    assert [f["batch_size"] for f in info["engine_latency_ms"]] == [1, 4]
    for f in info["engine_latency_ms"]:
        assert f["level"] == "all" and f["before"] > 0 and f["after"] > 0 and f["iters"] >= 10
        assert f["speedup"] > 0 and 0 <= f["slower_share"] <= 1  # the median of per-round (paired) ratios
    assert entry["warnings"][0].startswith("macs_reduction: asked 2x, got 3.96x")
    assert "[1/1] prune WARNING: macs_reduction: asked 2x, got 3.96x" in result.err  # shown despite --quiet
    assert "## Warnings\n\n- 1. prune: macs_reduction: asked 2x, got 3.96x" in (out / "report.md").read_text()
    assert not any(p.name.startswith("latency-") for p in (out / "stages").rglob("*"))  # temporary files removed


def test_latency_check_false_skips_the_timing_and_round_to_1_is_recorded(write_recipe, cli, digits_cnn_checkpoint,
                                                                         tmp_path) -> None:
    stage = "  - prune: {method: channel, ratio: 0.3, round_to: 1, latency_check: false, finetune: {epochs: 0}}\n"
    out = tmp_path / "run"
    assert cli("run", stage_recipe(write_recipe, digits_cnn_checkpoint, stage, target=None), "--out", out,
               "--quiet").code == 0
    entry = read_report(out)["stages"][0]
    assert "engine_latency_ms" not in entry["prune"] and entry["prune"]["round_to"] == 1
    assert entry["prune"]["round_to_default"] is False and "warnings" not in entry
    model = compress.load(out / entry["checkpoint"])
    assert _widths(model) == [23, 23, 23, 45, 45, 45]


class _Tokens(torch.nn.Module):
    """Token ids in (int64), as a text model takes them."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, width)
        self.conv = torch.nn.Conv1d(width, width, 3, padding=1)
        self.head = torch.nn.Linear(width, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.embed(ids).transpose(1, 2)).mean(2))


def test_engine_latency_feeds_the_model_its_own_input_dtype(tmp_path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 12))
    figures = latency.engine_latency(_Tokens(), _Tokens(8), ids, [1, 2], tmp_path, seconds=0.2)
    assert [f.batch_size for f in figures] == [1, 2] and all(f.before > 0 and f.after > 0 for f in figures)


def test_a_model_onnx_cannot_export_at_opset_13_still_prunes_with_a_warning(tmp_path) -> None:
    # aten::triu exports from opset 14 only (attention, which once served here, now exports at 13)
    figures, why = latency.run_advisory(
        lambda: latency.engine_latency(triu_digits(), triu_digits(), torch.randn(1, 1, 8, 8), [1], tmp_path,
                                       seconds=0.1))
    assert figures is None and why.startswith("engine latency not measured (") and "latency_check: false" in why
    assert "\n" not in why and list(tmp_path.iterdir()) == []  # the temporary exports are gone
