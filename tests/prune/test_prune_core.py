"""Pruning API: magnitude masks and schedules, channel surgery on torchvision models, plans, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers_errors import one_line_error
from helpers_prune import ConcatGrouped, Detached, HardReshape, ScaledHead
from helpers_quant import digits, top1
from torch import nn

import compress
from compress.errors import CheckpointError, CompressError
from compress.profile import count_macs
from compress.prune import Schedule, magnitude_masks, plan


def _digits_cnn(checkpoint) -> nn.Module:
    return compress.load(checkpoint).eval()


# ------------------------------------------------------------------------------------------------
# L1 unstructured


def test_magnitude_masks_remove_exactly_the_smallest_weights_per_layer_or_globally() -> None:
    torch.manual_seed(0)
    weights = {"a": torch.randn(10, 10), "b": torch.randn(30) * 10}
    local = magnitude_masks(weights, 0.3, "local")
    assert [int((~m).sum()) for m in local.values()] == [30, 9]
    assert weights["a"][~local["a"]].abs().max() <= weights["a"][local["a"]].abs().min()
    overall = magnitude_masks(weights, 0.3, "global")
    assert sum(int((~m).sum()) for m in overall.values()) == 39
    # one threshold: the small-scale layer loses far more than its share
    assert int((~overall["a"]).sum()) > 35
    kept = torch.cat([w[m].abs() for w, m in zip(weights.values(), overall.values(), strict=True)])
    dropped = torch.cat([w[~m].abs() for w, m in zip(weights.values(), overall.values(), strict=True)])
    assert dropped.max() <= kept.min()


def test_schedule_ramps_cubically_and_finishes_by_end_at() -> None:
    sched = Schedule(steps=5, start_ratio=0.1, end_ratio=0.9, curve="cubic", end_at=0.5)
    ratios = [sched.ratio(k) for k in range(5)]
    assert ratios[0] == pytest.approx(0.1) and ratios[-1] == pytest.approx(0.9)
    gaps = [b - a for a, b in zip(ratios, ratios[1:], strict=False)]
    assert all(g > 0 for g in gaps) and gaps[0] > gaps[-1] * 5  # cubic: most pruning early
    updates = sched.updates(101)
    assert sorted(updates) == [0, 12, 25, 38, 50] and updates[50] == pytest.approx(0.9)
    linear = Schedule(steps=3, start_ratio=0.2, end_ratio=0.8, curve="linear")
    assert [round(linear.ratio(k), 6) for k in range(3)] == [0.2, 0.5, 0.8]


def test_schedule_curve_typo_names_the_choices_and_the_closest() -> None:
    sched = Schedule(steps=3, start_ratio=0.2, end_ratio=0.8, curve="cubc")  # type: ignore[arg-type]
    assert one_line_error(CompressError, sched.check, "prune.schedule") == (
        "prune.schedule.curve: unknown 'cubc' (choose from cubic, linear); did you mean 'cubic'?")


def test_gradual_l1_holds_masks_through_finetune_and_ends_at_the_target(digits_cnn_checkpoint) -> None:
    model = _digits_cnn(digits_cnn_checkpoint)
    before = top1(model, digits("test"))
    pruner = compress.prune.l1_unstructured(
        model, schedule=Schedule(steps=4, start_ratio=0.3, end_ratio=0.75), scope="global", exclude=["stem.0"]
    )
    config = compress.FinetuneConfig(epochs=2, lr=0.01, seed=0)
    result = compress.finetune(model, digits("train", 64), config, evaluate=lambda m: top1(m, digits("test")),
                               callbacks=[pruner.callback()], progress=False)
    stats = pruner.make_permanent()
    assert pruner.ratio == pytest.approx(0.75) and pruner.masks == {}
    assert "stem.0" not in stats["layers"] and torch.count_nonzero(model.stem[0].weight) == model.stem[0].weight.numel()
    true_zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n in stats["layers"])
    assert true_zeros == round(0.75 * stats["weights"]) == stats["weights"] - stats["nonzero"]
    assert result.best_epoch == 2  # epoch 1 ended before the schedule reached 75%: not a result
    assert top1(model, digits("test")) >= before - 0.03


def test_one_shot_l1_masks_survive_optimizer_steps(digits_cnn_checkpoint) -> None:
    model = _digits_cnn(digits_cnn_checkpoint)
    pruner = compress.prune.l1_unstructured(model, ratio=0.5, include=["layer*"])
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if n in pruner.layers}
    compress.finetune(model, digits("train", 64), compress.FinetuneConfig(epochs=1, lr=0.05, seed=0),
                      callbacks=[pruner.callback()], progress=False)
    for name, was_zero in zeros.items():
        assert bool((model.get_submodule(name).weight[was_zero] == 0).all()), name
    assert pruner.stats()["sparsity"] == pytest.approx(0.5, abs=1e-4)


# ------------------------------------------------------------------------------------------------
# Channel pruning


def test_channel_pruning_removes_exactly_the_dead_channels_and_keeps_the_outputs(digits_cnn_checkpoint) -> None:
    model = _digits_cnn(digits_cnn_checkpoint)
    dead = torch.arange(0, 32, 2)  # half of layer1.conv1's filters contribute nothing
    with torch.no_grad():
        model.layer1.conv1.weight[dead] = 0
        model.layer1.bn1.weight[dead] = 0
        model.layer1.bn1.bias[dead] = 0
    x = next(iter(digits("test")))[0]
    expected = model(x)
    kept_weights = model.layer1.conv2.weight[:, 1::2].clone()
    compress.prune.channels(model, x[:2], ratio=0.5, include=["layer1.conv1"])
    assert model.layer1.conv1.out_channels == 16 and model.layer1.bn1.num_features == 16
    assert model.layer1.conv2.in_channels == 16 and torch.equal(model.layer1.conv2.weight, kept_weights)
    assert model.stem[0].out_channels == 32  # not included: untouched
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_bn_scale_importance_removes_the_smallest_gammas(digits_cnn_checkpoint) -> None:
    model = _digits_cnn(digits_cnn_checkpoint)
    with torch.no_grad():
        model.layer2.bn1.weight.copy_(torch.arange(1, 65, dtype=torch.float32))
    compress.prune.channels(model, torch.randn(2, 1, 8, 8), ratio=0.25, importance="bn_scale", include=["layer2.conv1"])
    assert torch.equal(model.layer2.bn1.weight, torch.arange(17, 65, dtype=torch.float32))


def test_global_scope_prunes_layers_unevenly_to_the_overall_ratio(digits_cnn_checkpoint) -> None:
    model = _digits_cnn(digits_cnn_checkpoint)
    with torch.no_grad():  # 24 of layer1.conv1's 32 filters become negligible (importance is group-normalised)
        model.layer1.conv1.weight[:24].mul_(0.001)
        model.layer1.bn1.weight[:24].mul_(0.001)
    compress.prune.channels(model, torch.randn(2, 1, 8, 8), ratio=0.5, scope="global", round_to=1)
    roots = [model.stem[0], model.layer1.conv1, model.layer2.conv1, model.layer2.conv2]
    assert sum(m.out_channels for m in roots) == 96  # half of 32 + 32 + 64 + 64, overall
    assert model.layer1.conv1.out_channels <= 8 and model.stem[0].out_channels > 16


def test_macs_target_is_reached_without_overshooting(digits_cnn_checkpoint) -> None:
    model = _digits_cnn(digits_cnn_checkpoint)
    x = torch.randn(2, 1, 8, 8)
    macs0 = count_macs(model, x)
    compress.prune.channels(model, x, macs_reduction=2.0, round_to=2)
    reduction = macs0 / count_macs(model, x)
    assert 2.0 <= reduction < 2.3
    assert all(m.out_channels % 2 == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


ARCHS = [
    ("resnet18", {}, lambda m: m.layer1[0].conv2.out_channels == m.conv1.out_channels == m.layer1[1].conv2.out_channels),
    ("mobilenet_v2", {}, lambda m: m.features[2].conv[1][0].groups == m.features[2].conv[1][0].out_channels),
    ("densenet121", {}, lambda m: m.features.transition1.conv.in_channels == m.features.denseblock1.denselayer6.conv2.out_channels * 6 + m.features.conv0.out_channels),
]


@pytest.mark.parametrize(("arch", "kwargs", "coupled"), ARCHS, ids=[a[0] for a in ARCHS])
def test_torchvision_models_prune_round_to_and_reload_from_the_plan(arch, kwargs, coupled, tmp_path) -> None:
    torch.manual_seed(0)
    model = compress.build(f"torchvision.models:{arch}", {"num_classes": 10, **kwargs}).eval()
    x = torch.randn(2, 3, 32, 32)
    macs0, params0 = count_macs(model, x), sum(p.numel() for p in model.parameters())
    compress.prune.channels(model, x, ratio=0.5, round_to=8)
    assert count_macs(model, x) < macs0 / 2.5 and sum(p.numel() for p in model.parameters()) < params0 / 2.5
    assert model(x).shape == (2, 10) and coupled(model)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert all(w % 8 == 0 for w in widths), widths
    compress.save(model, tmp_path / "pruned.pt")
    reloaded = compress.load(tmp_path / "pruned.pt").eval()
    torch.testing.assert_close(reloaded(x), model(x))


def test_pruned_model_exports_to_onnx_and_runs_in_onnxruntime(digits_cnn_checkpoint, tmp_path) -> None:
    model = _digits_cnn(digits_cnn_checkpoint)
    x = next(iter(digits("test")))[0]
    compress.prune.channels(model, x[:1], ratio=0.4)
    info = compress.export.onnx(model, x[:1], tmp_path / "m.onnx")
    engine = compress.export.onnxruntime.build_engine(info.path, tmp_path / "engine.onnx")
    torch.testing.assert_close(engine(x), model(x), rtol=1e-4, atol=1e-4)


def test_plan_naming_a_missing_module_is_a_checkpoint_error() -> None:
    model = compress.build("compress.zoo:digits_cnn", {})
    msg = one_line_error(CheckpointError, plan.apply, model, {"layer9.conv1": {"attrs": {"out_channels": 4}}})
    assert "layer9.conv1" in msg


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda m, x: compress.prune.channels(m, x, ratio=1.0), "ratio: 1.0 is outside [0, 1)"),
        (lambda m, x: compress.prune.channels(m, x, ratio=0.5, include=["head*"]), "pattern 'head*' matches no"),
        (lambda m, x: compress.prune.channels(m, x, ratio=0.97, scope="global"),
         "would remove every output channel of layer 'stem.0'"),
        (lambda m, x: compress.prune.channels(m, x, macs_reduction=1e9), "macs_reduction: 1e+09x is out of reach"),
        (lambda m, x: compress.prune.l1_unstructured(m, ratio=-0.1), "ratio: -0.1 is outside [0, 1)"),
        (lambda m, x: compress.prune.l1_unstructured(m, ratio=0.5, exclude=["nope"]), "pattern 'nope' matches no"),
        (lambda m, x: compress.prune.channels(m, x, ratio=0.5, importance="l3"),
         "prune.channels.importance: unknown 'l3' (choose from l1, l2, bn_scale)"),
        (lambda m, x: compress.prune.l1_unstructured(m, ratio=0.5, scope="globl"),
         "prune.l1_unstructured.scope: unknown 'globl' (choose from local, global); did you mean 'global'?"),
    ],
    ids=["ratio-1", "include", "every-channel", "macs-unreachable", "l1-ratio", "l1-exclude", "importance", "scope"],
)
def test_bad_pruning_arguments_are_one_line_errors_and_leave_the_model_intact(call, expected) -> None:
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_cnn", {}).eval()
    x = torch.randn(2, 1, 8, 8)
    reference = copy.deepcopy(model.state_dict())
    assert expected in one_line_error(CompressError, call, model, x)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_a_hard_coded_reshape_names_the_layer_and_restores_the_model() -> None:
    model = HardReshape()
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    msg = one_line_error(CompressError, compress.prune.channels, model, x, ratio=0.5, round_to=1)
    assert "layer 'conv1' breaks the model's forward" in msg
    assert model.conv1.out_channels == 8 and torch.equal(model(x), expected)
    msg = one_line_error(CompressError, compress.prune.channels, model, x, ratio=0.5, round_to=1, exclude=["conv1"])
    assert "no channel group can be pruned (fc: feeds the model's output" in msg and "conv1: left out by" in msg


def test_a_forward_the_tracer_cannot_follow_names_the_layer() -> None:
    model = Detached()
    x = torch.randn(2, 1, 8, 8)
    msg = one_line_error(CompressError, compress.prune.channels, model, x, ratio=0.5, round_to=1)
    assert "cannot follow the model past layer 'conv1'" in msg
    compress.prune.channels(model, x, ratio=0.5, round_to=1, exclude=["conv1"])
    assert model.conv1.out_channels == 8 and model.conv2.out_channels == 4 and model(x).shape == (2, 10)


def test_a_hard_coded_reshape_is_named_under_a_macs_target_too() -> None:
    model = HardReshape()
    msg = one_line_error(CompressError, compress.prune.channels, model, torch.randn(2, 1, 8, 8), macs_reduction=1.5,
                         round_to=1)
    assert "layer 'conv1' breaks the model's forward" in msg and model.conv1.out_channels == 8


def test_an_output_computed_from_the_head_keeps_the_head_and_the_plan_survives_save(tmp_path) -> None:
    x = torch.randn(2, 1, 8, 8)
    for _ in range(3):  # output layers are found by the graph, not by tensor ids that may be reused
        model = ScaledHead()
        compress.prune.channels(model, x, ratio=0.5, round_to=1)
        assert model.fc.out_features == 10 and model.c3.out_channels == 4
    # a model compress did not build still carries its plan into a checkpoint saved with its factory
    compress.save(model, tmp_path / "m.pt", factory="helpers_prune:scaled_head")
    torch.testing.assert_close(compress.load(tmp_path / "m.pt", trust=["helpers_prune"])(x), model(x))


def test_frozen_parameters_and_no_grad_callers_still_trace() -> None:
    model = ScaledHead().requires_grad_(False)
    with torch.no_grad():
        compress.prune.channels(model, torch.randn(2, 1, 8, 8), ratio=0.5, round_to=1)
    assert model.c1.out_channels == 4 and not any(p.requires_grad for p in model.parameters())


def test_a_concat_into_a_grouped_conv_is_kept_with_the_reason() -> None:
    model = ConcatGrouped()
    x = torch.randn(2, 1, 8, 8)
    pruner = compress.prune.ChannelPruner(model, x)
    assert pruner.prune(0.5) == {"g": [16, 8]} and model(x).shape == (2, 10)
    assert pruner.skipped["a"] == "grouped layer 'g' sees these channels among others"
