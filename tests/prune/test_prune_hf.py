"""Channel pruning of a Hugging Face BERT on token inputs (a dict of input_ids and attention_mask)."""

from __future__ import annotations

import pytest
import torch

from compress import prune, zoo
from compress.errors import CompressError

pytest.importorskip("transformers")


def _tokens() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"input_ids": torch.randint(2, 200, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}


def test_head_split_projections_are_refused_not_mixed() -> None:
    """BertSelfAttention reshapes query/key/value into heads itself: pruning their outputs channel by channel would
    leave 4 'heads' made of channels from every head, so it is refused in one line naming the module and the fix."""
    with pytest.raises(CompressError, match=r"^prune.channels: 'bert.encoder.layer.0.attention.self.\w+' is a "
                                            r"projection inside 'bert.encoder.layer.0.attention.self' \(BertSelfAttention\)"):
        prune.channels(zoo.bert_tiny(), _tokens(), ratio=0.5)


def test_the_rest_of_bert_prunes_on_token_inputs() -> None:
    x = _tokens()
    model = zoo.bert_tiny()
    before = sum(p.numel() for p in model.parameters())
    pruned = prune.channels(model, x, ratio=0.5, exclude=[f"bert.encoder.layer.{i}.attention.self.*" for i in range(2)])
    for i in range(2):
        q = pruned.bert.encoder.layer[i].attention.self.query
        assert q.out_features == 64  # 4 heads x 16 kept whole
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * before
    assert pruned(**x).logits.shape == (2, 4)
