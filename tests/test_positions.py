"""Per-position outputs (compress.positions): the class-axis rule for 3-D outputs, per-token metrics by hand with
-100 labels and masked positions left out, and batches padded to different lengths joined without changing a figure."""

from __future__ import annotations

import pytest
import torch
from helpers_models import token_tagger
from torch.utils.data import DataLoader

from compress import metrics
from compress.errors import CompressError, DataError
from compress.positions import attention_mask, class_dim, pad_cat
from compress.text_data import TaggedTokens, collate_trimmed


def test_class_axis_rule_for_3d_outputs() -> None:
    tokens = [(8, 12, 5), (8, 20, 5)]  # [N, T, C]: T follows the batch's token length
    assert class_dim(tokens, [{12}, {20}], "logits") == 2
    assert class_dim([(8, 5, 100)], [{100}], "map") == 1  # a 1-D conv's [N, C, L] on [N, channels, 100] signals
    assert class_dim([(8, 197, 768)], [{224}], "tokens") is None  # matches no length: compared per sample
    assert class_dim([(8, 10)], [{10}], "logits") == 1 and class_dim([(8, 3, 4, 4)], [set()], "map") == 1
    # one batch cannot tell (T == classes), another can: the one that can decides
    assert class_dim([(8, 5, 5), (8, 9, 5)], [{5}, {9}], "logits") == 2
    with pytest.raises(CompressError, match=r"^output 'logits' of shape \[8, 5, 5\]: cannot tell \[N, positions, "
                                            r"classes\] from \[N, classes, positions\] \(sequence lengths \[5\]\)"):
        class_dim([(8, 5, 5)], [{5}], "logits")
    with pytest.raises(CompressError, match="cannot tell"):  # batches that say different things
        class_dim([(8, 12, 5), (8, 5, 12)], [{12}, {12}], "logits")


def test_attention_mask_is_found_by_name_or_as_a_0_1_tensor() -> None:
    ids, mask = torch.tensor([[1, 7, 0]]), torch.tensor([[1, 1, 0]])
    assert torch.equal(attention_mask({"input_ids": ids, "attention_mask": mask}), mask.bool())
    assert torch.equal(attention_mask((ids, mask)), mask.bool())
    assert attention_mask((ids, ids)) is None and attention_mask(ids) is None


def test_per_token_metrics_by_hand() -> None:
    # 2 samples x 3 tokens x 4 classes; arg-max per token: [[0, 1, 2], [3, 3, 1]]
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2], [3, 3, 1]]), 4).float()
    labels = torch.tensor([[0, 2, -100], [3, -100, 1]])  # 4 labelled tokens, 3 right
    assert metrics.top1(logits, labels, dim=2) == 0.75
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()  # the last token of sample 2 does not count
    assert metrics.top1(logits, labels, dim=2, valid=mask) == pytest.approx(2 / 3, abs=1e-15)
    out = metrics.Outputs(logits, labels)  # [N, T] labels tell the class axis
    assert out.class_dims == {"output": 2}
    ref = logits.clone()
    ref[1, 2] = torch.tensor([9.0, 0, 0, 0])  # a change at a masked position...
    ref[0, 0] = torch.tensor([0, 9.0, 0, 0])  # ...and at a counted one
    assert metrics.fidelity(logits, ref, 2)["agreement"] == pytest.approx(4 / 6, abs=1e-15)
    assert metrics.fidelity(logits, ref, 2, mask)["agreement"] == 0.8  # 4 of 5 counted tokens
    with pytest.raises(DataError, match=r"top1 needs \(N, classes\) outputs"):
        metrics.top1(logits[:, 0], labels)


def test_pad_cat_pads_the_positions_not_the_classes() -> None:
    joined = pad_cat([torch.ones(2, 3, 4), torch.ones(1, 5, 4)], 0.0, 2, "output 'x'")
    assert joined.shape == (3, 5, 4) and float(joined[:2, 3:].abs().sum()) == 0.0
    labels = pad_cat([torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], -100, None, "labels")
    assert labels[:2, 3:].eq(-100).all() and labels[2].eq(0).all()
    with pytest.raises(DataError, match=r"^output 'x': per-sample shapes differ between batches"):
        pad_cat([torch.ones(2, 3, 4), torch.ones(1, 3, 6)], 0.0, 2, "output 'x'")


@pytest.fixture(scope="module")
def tagger() -> torch.nn.Module:
    return token_tagger()


def test_dynamic_padding_changes_no_figure(tagger: torch.nn.Module) -> None:
    """Batches padded per batch (13..32 tokens) give the figures batches padded to 32 give: the padding
    collect_many adds and the attention mask's zeros are left out alike."""
    data = TaggedTokens("test", samples=96)
    fixed = metrics.collect(tagger, DataLoader(data, batch_size=4))
    loader = DataLoader(data, batch_size=4, collate_fn=collate_trimmed)
    assert len({b["input_ids"].shape[1] for b in loader}) > 5  # the batches really differ in length
    dynamic = metrics.collect(tagger, loader)
    assert dynamic.logits.shape == fixed.logits.shape == (96, 32, 5) and dynamic.class_dims == {"output": 2}
    assert torch.equal(dynamic.valid["output"], data.attention_mask.bool())  # padding and mask 0 alike
    assert torch.equal(dynamic.labels, data.labels)  # the padding's labels are -100, as the fixed data's
    top1 = metrics.score("top1", dynamic)["top1"]
    assert top1 == metrics.score("top1", fixed)["top1"]
    pred, counted = fixed.logits.argmax(2), data.labels != -100  # by hand: every labelled token
    assert top1 == float((pred == data.labels)[counted].double().mean())
    assert top1 > float((data.labels[counted] == 0).double().mean())  # better than calling every token filler
    assert metrics.task_fidelity(dynamic, fixed)["agreement"] == 1.0  # the same tokens, one per position
