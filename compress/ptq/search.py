"""Clipping-range searches over a histogram of |x|, vectorised over every candidate in torch.

``hist[j]`` counts values in ``[j * width, (j + 1) * width)``; candidates are bin edges.
"""

from __future__ import annotations

import torch


def percentile_amax(hist: torch.Tensor, width: float, percentile: float) -> torch.Tensor:
    """The right edge of the bin where the cumulative count reaches ``percentile`` percent."""
    cdf = torch.cumsum(hist, 0)
    target = cdf[-1] * (percentile / 100.0)
    index = torch.searchsorted(cdf, target.reshape(1)).clamp(max=len(hist) - 1)
    return ((index.float() + 1) * width).reshape(())


def entropy_amax(
    hist: torch.Tensor, width: float, levels: int = 128, start: int | None = None, zero_spike: bool = False
) -> torch.Tensor:
    """TensorRT-style KL calibration: the ``amax`` whose ``levels``-level quantization of the
    clipped histogram diverges least from it.

    ``zero_spike``: the tensor is a ReLU output, whose exact zeros pile up in bin 0; as TensorRT
    and pytorch-quantization do, bin 0 then counts as bin 1 so that spike does not drive the
    search towards tiny ranges.

    For each candidate ``i`` (bins kept), the reference P is ``hist[:i]`` with the clipped tail added
    to its last bin; Q merges ``hist[:i]`` into ``levels`` groups of ``i // levels`` bins (the last
    takes the remainder) and spreads each group's count evenly over its non-empty bins. All
    candidates are evaluated at once from prefix sums: cost O(candidates * levels), no Python loop.
    """
    h = hist.double().clone()
    if zero_spike and len(h) > 1:
        h[0] = h[1]
    bins = len(h)
    start = levels if start is None else start
    if bins <= start:
        return torch.tensor(bins * width)
    dev = h.device
    zero = h.new_zeros(1)
    csum = torch.cat([zero, torch.cumsum(h, 0)])  # csum[k] = sum(h[:k])
    cnz = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    hlogh = torch.where(h > 0, h * torch.log(h.clamp_min(1e-300)), h.new_zeros(()))
    chl = torch.cat([zero, torch.cumsum(hlogh, 0)])
    total = csum[-1]

    i = torch.arange(start, bins + 1, device=dev)  # candidates: keep bins [0, i)
    merged = (i // levels).unsqueeze(1)  # bins per group
    g = torch.arange(levels, device=dev).unsqueeze(0)
    lo = g * merged
    hi = torch.where(g == levels - 1, i.unsqueeze(1), (g + 1) * merged)
    s = csum[hi] - csum[lo]  # group counts S_g
    n = cnz[hi] - cnz[lo]  # non-empty bins per group N_g
    s_log_q = torch.where(s > 0, s * torch.log(s.clamp_min(1e-300) / n.clamp_min(1)), h.new_zeros(()))

    tail = total - csum[i]
    last = h[i - 1]
    p_last = last + tail
    sum_plogp = chl[i - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp_min(1e-300)), h.new_zeros(()))
    q_last = torch.where(n[:, -1] > 0, s[:, -1] / n[:, -1].clamp_min(1), h.new_zeros(()))
    sum_plogq = s_log_q.sum(1) + torch.where(tail > 0, tail * torch.log(q_last.clamp_min(1e-300)), h.new_zeros(()))
    q_total = csum[i]
    kl = (sum_plogp - sum_plogq) / total - torch.log(total) + torch.log(q_total.clamp_min(1e-300))
    kl = torch.where((tail > 0) & (last == 0), torch.full_like(kl, float("inf")), kl)
    best = int(torch.argmin(kl))
    return (i[best].double() * width).float().reshape(())


def mse_amax(
    hist: torch.Tensor, width: float, qmax: int = 127, start: int = 64, candidates: int = 512, chunk: int = 128
) -> torch.Tensor:
    """The ``amax`` minimising the expected squared quantization error of the histogram's values
    (bin centres), over up to ``candidates`` bin edges from ``start`` to the top (chunked)."""
    h = hist.double()
    bins = len(h)
    centers = (torch.arange(bins, device=h.device, dtype=torch.float64) + 0.5) * width
    edges = torch.linspace(min(start, bins), bins, min(candidates, bins), device=h.device, dtype=torch.float64)
    candidates = torch.unique(torch.round(edges)) * width
    candidates = candidates[candidates > 0]
    errors = []
    for part in candidates.split(chunk):  # type: ignore[union-attr]
        scale = (part / qmax).unsqueeze(1)
        q = torch.clamp(torch.round(centers / scale), max=qmax) * scale
        errors.append(((centers - q) ** 2 * h).sum(1))
    best = int(torch.argmin(torch.cat(errors)))
    return candidates[best].float().reshape(())
