"""Teacher outputs kept per training sample, so later epochs skip the teacher's forward pass.

Memory: ``samples x (teacher output + hint features per sample) x 4 bytes`` on the training device
(digits: 1437 x 10 logits = 57 KB; ImageNet-1k logits alone: 1.28 M x 1000 x 4 B = 5.1 GB), refused
above ``cache_max_mb``. Keyed by dataset index, so shuffling is fine; each sample's inputs are
fingerprinted, and inputs that change between epochs (random augmentation) are an error, not a
silently stale teacher. The fingerprint leaves padding out (positions whose attention mask is 0, and
trailing zeros), so batches padded to different sequence lengths (dynamic padding) reuse per-sample
outputs (``[N, classes]``); teacher outputs whose per-sample shape follows the padding (per-token
``[N, T, classes]``) are refused in one line: a sample met again in a longer batch would lack its
outputs at the extra positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.errors import CompressError
from compress.inputs import Inputs, take, tensors
from compress.positions import attention_mask

Outputs = dict[str, torch.Tensor]  # "" -> logits, layer name -> hint feature


_PHI, _SQRT2 = (5**0.5 - 1) / 2, 2**0.5


def _probe(size: int, tensor: int, device: torch.device) -> torch.Tensor:
    """Weights in [0.5, 1.5) for the places 0..size-1 of input ``tensor``'s flattened sample (a Weyl sequence:
    a place's weight does not depend on ``size``)."""
    places = torch.arange(1, size + 1, dtype=torch.float64, device=device)
    return torch.frac(places * _PHI + tensor * _SQRT2) + 0.5


def per_sample_bytes(outputs: Outputs) -> int:
    return sum(t[0].numel() * 4 for t in outputs.values())


def check_budget(samples: int, outputs: Outputs, max_mb: float, where: str) -> None:
    """Refuse a cache of ``samples`` x the per-sample size of ``outputs`` above ``max_mb``."""
    mb = samples * per_sample_bytes(outputs) / 2**20
    if mb > max_mb:
        raise CompressError(
            f"{where}.cache: {samples} samples x {per_sample_bytes(outputs):,} bytes of teacher outputs "
            f"= {mb:.0f} MB > cache_max_mb {max_mb:g}; raise cache_max_mb or set cache: false"
        )


class TeacherCache:
    def __init__(self, max_mb: float, where: str, num_samples: int = 0) -> None:
        self.max_mb, self.where, self.num_samples = max_mb, where, num_samples
        self.store: Outputs = {}
        self.filled: torch.Tensor | None = None
        self.prints: torch.Tensor | None = None
        self.reused = self.computed = 0  # samples read from the cache / run through the teacher

    @staticmethod
    def _fingerprint(inputs: Inputs) -> torch.Tensor:
        """Per sample: the sum of every input value, and their sum weighted by a probe that depends only on
        the value's place in its sample (so trailing padding, zeroed by the mask where there is one, adds nothing)."""
        mask = attention_mask(inputs)
        total: torch.Tensor | float = 0.0
        weighted: torch.Tensor | float = 0.0
        for k, t in enumerate(tensors(inputs)):
            t = t.detach()
            if mask is not None and t.dim() >= 2 and t.shape[:2] == mask.shape:  # padding counts as 0, whatever its id
                t = torch.where(mask.to(t.device).view(*mask.shape, *[1] * (t.dim() - 2)), t, torch.zeros_like(t))
            flat = t.flatten(1).double()
            total = total + flat.sum(1)
            weighted = weighted + flat @ _probe(flat.shape[1], k, flat.device)
        return torch.stack([total, weighted], 1)  # type: ignore[list-item]

    def lookup(self, indices: torch.Tensor, inputs: Inputs, forward: Callable[[Inputs], Outputs]) -> Outputs:
        """Teacher outputs for the batch: cached samples are read back, the rest run through ``forward``
        (the teacher is in eval mode, so a sample's outputs do not depend on its batch).

        Raises:
            CompressError: a sample's inputs changed since it was cached, or batches differ in per-sample shape.
        """
        prints = self._fingerprint(inputs)
        if self.filled is None or int(indices.max()) >= self.filled.numel():
            missing = torch.ones(len(indices), dtype=torch.bool)
        else:
            missing = ~self.filled[indices.to(self.filled.device)].cpu()
        seen = ~missing
        if bool(seen.any()):
            idx = indices[seen].to(self.prints.device)  # type: ignore[union-attr]
            if not torch.allclose(self.prints[idx], prints[seen.to(prints.device)].to(self.prints.device),  # type: ignore[index]
                                  rtol=1e-5, atol=1e-6):
                raise CompressError(
                    f"{self.where}.cache: a training sample's inputs changed between epochs (random augmentation?); "
                    "cached teacher outputs would be stale: set cache: false"
                )
        if bool(missing.all()):
            out = forward(inputs)
            self._put(indices, prints, out)
            self.computed += len(indices)
            return out
        if bool(missing.any()):
            pick = missing.to(tensors(inputs)[0].device)
            self._put(indices[missing], prints[pick.to(prints.device)], forward(take(inputs, pick)))
            self.computed += int(missing.sum())
        self.reused += int(seen.sum())
        idx = indices.to(self.filled.device)  # type: ignore[union-attr]
        return {name: t[idx] for name, t in self.store.items()}

    def _put(self, indices: torch.Tensor, prints: torch.Tensor, outputs: Outputs) -> None:
        for name, t in outputs.items():
            if name in self.store and t.shape[1:] != self.store[name].shape[1:]:
                raise CompressError(
                    f"{self.where}.cache: teacher outputs of {list(self.store[name].shape[1:])} per sample on one batch "
                    f"and {list(t.shape[1:])} on another (per-token outputs of batches padded to different lengths); "
                    "pad every batch to one length or set cache: false")
        need = int(indices.max()) + 1
        if self.filled is None or need > self.filled.numel():
            self._grow(max(need, self.num_samples, 2 * (0 if self.filled is None else self.filled.numel())), outputs)
        idx = indices.to(self.filled.device)  # type: ignore[union-attr]
        for name, t in outputs.items():
            self.store[name][idx] = t.detach().float()
        self.prints[idx] = prints.to(self.prints.device)  # type: ignore[index]
        self.filled[idx] = True  # type: ignore[index]

    def _grow(self, capacity: int, outputs: Outputs) -> None:
        check_budget(capacity, outputs, self.max_mb, self.where)
        old = self.filled.numel() if self.filled is not None else 0
        device = next(iter(outputs.values())).device
        for name, t in outputs.items():
            grown = torch.zeros((capacity, *t.shape[1:]), dtype=torch.float32, device=device)
            if old:
                grown[:old] = self.store[name]
            self.store[name] = grown
        prints = torch.zeros((capacity, 2), dtype=torch.float64, device=device)
        filled = torch.zeros(capacity, dtype=torch.bool, device=device)
        if old:
            prints[:old], filled[:old] = self.prints, self.filled  # type: ignore[index]
        self.prints, self.filled = prints, filled

    @property
    def megabytes(self) -> float:
        return sum(t.numel() * 4 for t in self.store.values()) / 2**20
