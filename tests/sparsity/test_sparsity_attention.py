"""2:4 on attention projections: nn.MultiheadAttention's packed q/k/v weight and out_proj, through the INT8
attention rewrite, checkpoints, QAT steps and the ONNX export's 2:4 verification."""

from __future__ import annotations

import pytest
import torch
from helpers_vit import HEADS, LAYERS, MLP, D

import compress
from compress import sparsity, structure
from compress.errors import CheckpointError
from compress.sparsity.masks import SparseMasks, mask_callback
from compress.sparsity.pattern import satisfies
from compress.zoo import vit_tiny

FACTORY, KWARGS = "compress.zoo:vit_tiny", {"hidden_dim": D, "num_heads": HEADS, "mlp_dim": MLP}
ATTN = "encoder.layers.encoder_layer_{}.self_attention"
SPLIT = ("q_proj", "k_proj", "v_proj", "out_proj")


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_tiny(**KWARGS).eval()


def test_packed_qkv_is_2to4_per_block_and_stays_so_through_the_int8_rewrite_reload_and_export(tmp_path) -> None:
    model, x = _vit(), torch.randn(4, 3, 32, 32)
    result = sparsity.apply_2to4(model, example_input=x[:1])
    packed = [f"{ATTN.format(i)}.in_proj_weight" for i in range(LAYERS)]
    assert set(packed) <= set(result.layers) and not set(packed) & set(result.skipped)
    for name in packed:
        weight = model.get_parameter(name)
        assert all(satisfies(block) for block in weight.split(D))  # q, k and v each keep 2 of every 4
        assert float((weight == 0).float().mean()) == 0.5
    assert set(packed) <= set(sparsity.verify_model(model).sparse_layers)
    compress.save(model, tmp_path / "sparse.pt", factory=FACTORY, kwargs=KWARGS)
    loaded = compress.load(tmp_path / "sparse.pt").eval()
    assert torch.equal(loaded(x), model(x))
    # the INT8 rewrite splits q/k/v into layers: the masks follow them under their new names
    qmodel = compress.quant.prepare(loaded, target="tensorrt")
    split = [f"{ATTN.format(i)}.{p}" for i in range(LAYERS) for p in SPLIT]
    assert set(split) <= set(sparsity.sparse_layers(qmodel)) and not any("in_proj" in n for n in sparsity.sparse_layers(qmodel))
    compress.ptq.calibrate(qmodel, [x], method="max")
    compress.export.onnx(qmodel, x[:1], tmp_path / "int8.onnx", opset=13, target="tensorrt")
    check = sparsity.verify_onnx(tmp_path / "int8.onnx")  # after dequantization: 2:4 on every projection
    assert set(split) <= set(check.sparse_layers) and check.missing(sparsity.sparse_layers(qmodel)) == []
    # a checkpoint of the rewritten, quantized model verifies the split weights against the packed masks
    compress.save(qmodel, tmp_path / "int8.pt")
    assert torch.equal(compress.load(tmp_path / "int8.pt").eval()(x), qmodel.eval()(x))


def test_masks_are_reapplied_to_the_split_projections_after_a_step() -> None:
    model = _vit()
    sparsity.apply_2to4(model, example_input=torch.randn(1, 3, 32, 32))
    qmodel = compress.quant.prepare(model, target="tensorrt")
    q_proj = qmodel.get_submodule(f"{ATTN.format(0)}.q_proj")
    with torch.no_grad():  # what an optimizer step does to pruned weights
        q_proj.weight.add_(1.0)
    assert not satisfies(q_proj.weight)
    callback = mask_callback(qmodel)
    assert callback is not None
    callback.after_step(None)  # type: ignore[arg-type]
    assert satisfies(q_proj.weight)
    masks = SparseMasks(qmodel)
    assert masks.masks[f"{ATTN.format(0)}.q_proj"].shape == (D, D)


def test_a_packed_mask_that_does_not_fit_the_attention_is_refused_in_one_line(tmp_path) -> None:
    model = _vit()
    sparsity.apply_2to4(model, example_input=torch.randn(1, 3, 32, 32), include=["*in_proj_weight"])
    compress.save(model, tmp_path / "bad.pt", factory=FACTORY, kwargs=KWARGS)
    saved = torch.load(tmp_path / "bad.pt", weights_only=True)
    layers = saved["structure"][-1]["payload"]["layers"]
    layers[f"{ATTN.format(0)}.in_proj_weight"] = layers.pop(f"{ATTN.format(0)}.in_proj_weight")[:-1]
    torch.save(saved, tmp_path / "bad.pt")  # a file edited by other code (structure is not in the weights' digest)
    layers = structure.origin_of(model).structure[-1]["payload"]["layers"]
    layers[f"{ATTN.format(0)}.in_proj_weight"] = layers.pop(f"{ATTN.format(0)}.in_proj_weight")[:-1]
    with pytest.raises(CheckpointError, match="no longer fits") as err:  # save never writes what load refuses
        compress.save(model, tmp_path / "bad2.pt", factory=FACTORY, kwargs=KWARGS)
    assert "\n" not in str(err.value) and not (tmp_path / "bad2.pt").exists()
    with pytest.raises(CheckpointError) as err:
        compress.load(tmp_path / "bad.pt")
    message = str(err.value)
    assert "\n" not in message and f"{ATTN.format(0)}.in_proj_weight" in message and "does not fit" in message
