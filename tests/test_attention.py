"""compress.attention: the explicit attention equals F.scaled_dot_product_attention, and the switch restores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from compress.attention import AttentionPoints, attention, explicit_attention

# float32 keeps ~7 digits; the explicit form scales Q before Q·Kᵀ where torch's kernels may scale elsewhere
# and sum in another order: measured differences are a few ulp (< 1e-6 of the output's RMS). 1e-5 of the RMS
# leaves room for other kernels while a wrong scale, mask or head grouping moves outputs by O(RMS).
REL = 1e-5


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rms = ref.pow(2).mean().sqrt()
    assert (ours - ref).abs().max() <= REL * rms, (ours - ref).abs().max() / rms


@pytest.fixture
def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, 7, 16, generator=g) for _ in range(3))  # type: ignore[return-value]


def test_plain_scaled_and_causal_match_sdpa(qkv) -> None:
    q, k, v = qkv
    _close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    _close(attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))
    _close(attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_bool_and_float_masks_match_sdpa(qkv) -> None:
    q, k, v = qkv
    keep = torch.rand(2, 1, 7, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every query row attends somewhere (an all-masked row is NaN in both)
    _close(attention(q, k, v, keep), F.scaled_dot_product_attention(q, k, v, keep))
    bias = torch.randn(7, 7, generator=torch.Generator().manual_seed(2))
    _close(attention(q, k, v, bias), F.scaled_dot_product_attention(q, k, v, bias))


def test_grouped_query_attention_matches_sdpa(qkv) -> None:
    q, k, v = qkv
    k2, v2 = k[:, :2], v[:, :2]
    _close(attention(q, k2, v2, enable_gqa=True), F.scaled_dot_product_attention(q, k2, v2, enable_gqa=True))


def test_points_see_the_four_matmul_inputs(qkv) -> None:
    q, k, v = qkv
    seen: dict[str, tuple[int, ...]] = {}

    def note(name: str):
        def point(x: torch.Tensor) -> torch.Tensor:
            seen[name] = tuple(x.shape)
            return x
        return point

    points = AttentionPoints(query=note("query"), key=note("key"), probs=note("probs"), value=note("value"))
    attention(q, k, v, points=points)
    assert seen == {"query": (2, 4, 7, 16), "key": (2, 4, 16, 7), "probs": (2, 4, 7, 7), "value": (2, 4, 7, 16)}
    # the scale is applied before the query point: a quantizer there sees what the MatMul reads
    doubled = AttentionPoints(query=lambda x: x * 2)
    _close(attention(q, k, v, points=doubled), F.scaled_dot_product_attention(q, k, v, scale=2 / 4.0))


def test_switch_routes_sdpa_and_restores_on_error(qkv) -> None:
    q, k, v = qkv
    before, fast = F.scaled_dot_product_attention, torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(KeyError), explicit_attention():
        assert F.scaled_dot_product_attention is not before
        assert not torch.backends.mha.get_fastpath_enabled()
        _close(F.scaled_dot_product_attention(q, k, v), before(q, k, v))
        raise KeyError("inside")
    assert F.scaled_dot_product_attention is before
    assert torch.backends.mha.get_fastpath_enabled() == fast


def test_is_causal_with_a_mask_is_refused(qkv) -> None:
    q, k, v = qkv
    with pytest.raises(ValueError, match="is_causal"):
        attention(q, k, v, torch.ones(7, 7, dtype=torch.bool), is_causal=True)


def test_a_query_row_that_attends_to_nothing_is_zero_as_in_torch(qkv) -> None:
    q, k, v = qkv
    keep = torch.ones(7, 7, dtype=torch.bool)
    keep[3] = False
    bias = torch.zeros(7, 7).masked_fill(~keep, float("-inf"))
    for mask in (keep, bias):
        ours = attention(q, k, v, mask)
        assert torch.equal(ours[..., 3, :], torch.zeros(2, 4, 16))
        _close(ours, F.scaled_dot_product_attention(q, k, v, mask))
