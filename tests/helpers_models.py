"""Model factories for bad-input tests, referenced as helpers_models:FN."""

import torch
from torch import nn


class TwoInputs(nn.Module):
    """A model whose forward needs two tensors: fed one, it raises TypeError (not RuntimeError)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) * mask)


def two_inputs() -> TwoInputs:
    return TwoInputs()


def failing_metric(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    raise ZeroDivisionError("no samples")


def tiny_linear() -> nn.Module:
    """A model from a module compress does not trust by default (checkpoint trust tests)."""
    return nn.Sequential(nn.Linear(4, 3))


class LogitsFeatures(nn.Module):
    """A digits classifier returning ``(logits, features)``: ``head`` feeds only the logits, ``feat`` only the
    features, so a fault planted in one layer reaches one output."""

    def __init__(self, classes: int = 10, features: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32),
                                   nn.ReLU())
        self.head = nn.Linear(32, classes)
        self.feat = nn.Linear(32, features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.head(h), self.feat(h)


def logits_features(classes: int = 10, features: int = 16) -> LogitsFeatures:
    return LogitsFeatures(classes, features)


class Logits(nn.Module):
    """A Hugging Face model's ``.logits`` as a plain tensor output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


class TokenTagger(nn.Module):
    """A token classifier: ``forward(input_ids, attention_mask)`` -> per-token logits ``[N, T, classes]`` (classes
    last, as Hugging Face's ``BertForTokenClassification``). Each token's logits depend on that token alone, so a
    sample's logits do not depend on how far its batch is padded."""

    def __init__(self, vocab: int = 256, width: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.head(torch.relu(self.fc(h)))


def token_tagger(steps: int = 30) -> TokenTagger:
    """A :class:`TokenTagger` briefly trained (fixed seed, ``steps`` Adam steps, about a second) on the generated
    per-token topic task (``compress.text_data.TaggedTokens``)."""
    from compress.text_data import TaggedTokens

    torch.manual_seed(0)
    model, data = TokenTagger(), TaggedTokens("train", samples=256)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(data)
        logits = model(data.input_ids[i], data.attention_mask[i])
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), data.labels[i], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
