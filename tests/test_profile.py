"""MACs: every convolution and matmul forward runs, checked against torch's flop counter and written-out counts."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from helpers_vit import AV, CLASSES, LAYERS, MLP, OUT, PATCH, QKV, SCORES, VIT_MACS, D, T, tiny_vit
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import compress
from compress.profile import count_macs, layer_macs, profile_macs
from compress.zoo import digits_cnn


def torch_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """torch's own counter, on the path it can see: SDPA as plain matmuls (its CPU kernel has no formula)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.eval()(x[:1])  # grad enabled: MultiheadAttention's fused fast path stays off
    return counter.get_total_flops() // 2


def test_vit_macs_match_torch_flop_counter_and_the_written_out_count() -> None:
    vit, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    macs = count_macs(vit, x)
    assert macs == VIT_MACS == 414_144  # integer shapes: exact, no tolerance needed
    assert abs(macs - torch_counter_macs(vit, x)) <= VIT_MACS // 100  # the 1 %; in fact equal
    assert macs == torch_counter_macs(vit, x)


def test_vit_macs_go_to_the_layer_that_reads_the_weight_or_the_module_that_runs_the_matmul() -> None:
    vit = tiny_vit()
    profile = profile_macs(vit, torch.randn(1, 3, 32, 32))
    attn = "encoder.layers.encoder_layer_0.self_attention"
    assert profile.modules["conv_proj"] == PATCH and profile.modules["heads.head"] == D * CLASSES
    # out_proj's forward never runs (F.multi_head_attention_forward reads its weight): it still gets its MACs
    assert profile.modules[f"{attn}.out_proj"] == OUT
    # the attention module keeps its packed in_proj and the Q·Kᵀ / A·V it runs itself
    assert profile.modules[attn] == QKV + SCORES + AV
    assert profile.params[f"{attn}.in_proj_weight"] == QKV
    assert profile.modules["encoder.layers.encoder_layer_1.mlp.0"] == T * D * MLP
    assert profile.unweighted == LAYERS * (SCORES + AV)
    assert sum(profile.modules.values()) == profile.total == VIT_MACS


def test_mha_fast_path_and_train_mode_are_restored() -> None:
    vit = tiny_vit().train()
    before = torch.backends.mha.get_fastpath_enabled()
    count_macs(vit, torch.randn(1, 3, 32, 32))
    assert vit.training and torch.backends.mha.get_fastpath_enabled() == before
    # in eval under no_grad the fast path would run one fused kernel no formula knows; it is off while counting
    with torch.no_grad():
        assert count_macs(vit.eval(), torch.randn(1, 3, 32, 32)) == VIT_MACS


def test_transformer_encoder_counts_its_attention() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(1, 10, 32)
    per_layer = 10 * 32 * 96 + 2 * 10 * 10 * 32 + 10 * 32 * 32 + 2 * 10 * 32 * 64
    assert count_macs(model, x) == 2 * per_layer == torch_counter_macs(model, x)


class Functional(nn.Module):
    """Matmuls no Conv/Linear hook sees: F.linear on its own weight, einsum, bmm and a matrix-vector product."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 16))
        self.v = nn.Parameter(torch.randn(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 5, 16]
        h = F.linear(x, self.weight)                     # 5*16*24
        a = torch.einsum("btd,bsd->bts", h, h)           # 5*5*24
        h = torch.bmm(a, h)                              # 5*5*24
        return h @ self.v                                # 5*24 (mv after flattening)


def test_functional_matmuls_count_and_go_to_their_module() -> None:
    model = nn.Sequential(Functional())
    profile = profile_macs(model, torch.randn(3, 5, 16))
    assert profile.total == 5 * 16 * 24 + 2 * 5 * 5 * 24 + 5 * 24
    assert profile.modules == {"0": profile.total}
    assert profile.params == {"0.weight": 5 * 16 * 24, "0.v": 5 * 24}


def test_grouped_and_transposed_convs_count_as_before() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2))
    # conv: 8 outputs x 6x6 positions x (4/2 inputs x 3x3); transposed: each of 8x6x6 inputs feeds 4/2 x 2x2 outputs
    assert layer_macs(model, torch.randn(2, 4, 6, 6)) == {"0": 8 * 36 * 2 * 9, "1": 8 * 36 * 2 * 4}


def test_cnn_counts_are_unchanged_conv_and_linear_only() -> None:
    # digits_cnn's figure before this counter (hooks on Conv/Linear) was the same: CNN counts did not move
    assert count_macs(digits_cnn(), torch.randn(4, 1, 8, 8)) == 2_116_224


def test_fake_quant_model_counts_as_its_float_model() -> None:
    model = digits_cnn()
    x = torch.randn(16, 1, 8, 8)
    float_macs = count_macs(model, x)
    qmodel = compress.quant.prepare(copy.deepcopy(model), target="tensorrt")
    compress.ptq.calibrate(qmodel, [x], "max")
    assert count_macs(qmodel, x) == float_macs
    assert set(layer_macs(qmodel, x)) >= {n for n in layer_macs(model, x)}


def test_sdpa_counts_on_cpu_too() -> None:
    q = torch.randn(1, 2, 7, 16)  # CPU runs a fused kernel torch's counter has no formula for

    class Attn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(x, x, x)

    assert count_macs(Attn(), q) == 2 * (2 * 7 * 7 * 16)


def test_weight_bytes_count_int8_weights_as_one_byte_and_float_ones_at_their_size() -> None:
    model = digits_cnn(num_classes=10)
    weights = {n: p.numel() for n, p in model.named_parameters()}
    assert compress.profile.weight_bytes(model) == 4 * sum(weights.values())  # float32 throughout
    qmodel = compress.quant.prepare(copy.deepcopy(model), target="onnxruntime")
    layers = [n for n, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")]
    assert layers  # every conv and the classifier got a weight quantizer
    int8 = sum(weights[f"{n}.weight"] for n in layers)
    assert compress.profile.weight_bytes(qmodel) == 4 * sum(weights.values()) - 3 * int8
    kept = compress.quant.keep_float(qmodel, [layers[0]])[0].name  # one unit back to float: its weight 4 bytes again
    assert compress.profile.weight_bytes(qmodel) == 4 * sum(weights.values()) - 3 * (int8 - weights[f"{kept}.weight"])
