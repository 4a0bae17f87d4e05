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


MAX_CLIP_ERROR = 1.0


def entropy_amax(
    hist: torch.Tensor, width: float, levels: int = 128, start: int = 128, zero_spike: bool = False,
    max_clip_error: float = MAX_CLIP_ERROR, max_clip: float | None = None,
) -> torch.Tensor:
    """TensorRT-style KL calibration: the ``amax`` whose ``levels``-level quantization of the
    clipped histogram diverges least from it.

    Candidates are the bin edges ``i`` from ``start`` up to the last non-empty bin (never above the
    observed range, however far the histogram's range overshoots it). For each, the reference P is
    ``hist[:i]`` with the clipped tail added to its last bin; Q merges ``hist[:i]`` into ``levels``
    groups, bin ``j`` going to group ``floor(j * levels / i)`` (TensorRT's ``linspace`` grouping: equal
    widths to within one bin, no remainder group), and spreads each group's count evenly over its
    non-empty bins. Ties go to the larger ``amax``, as in TensorRT. All candidates are evaluated at
    once from prefix sums: cost O(candidates * levels), no Python loop.

    ``zero_spike``: the tensor is a ReLU output, whose exact zeros pile up in bin 0; as TensorRT
    and pytorch-quantization do, bin 0 then counts as bin 1 so that spike does not drive the
    search towards tiny ranges.

    A saturation spike (the last non-empty bin holds at least ``SPIKE_SHARE`` of all values and
    ``SPIKE_RATIO`` times the fullest of the ``SPIKE_WINDOW`` bins below it: a ReLU6/clamp bound)
    is never clipped: Q smears that point mass over a whole group, so KL prefers to clip it, yet a
    point mass at ``amax`` quantizes exactly while clipping moves every value in it.

    ``max_clip_error``: candidates whose clipping error (the sum of squared distances the clipped
    values move, from bin centres) exceeds this multiple of their rounding error (``step**2 / 12``
    per value in range, ``step = amax / (levels - 1)``) are not considered. P lumps the clipped tail
    into one bin, so KL charges clipping only the smearing of that lump, not the distance each
    clipped value moves: TensorRT's search clipped MobileNetV2 ReLU6 outputs to 0.68-0.85 x their
    max (up to 0.1 % of the values moved by up to 1.6), which raised the engine's logit MSE
    against FP32 1.5-2x (two seeds) (benchmarks/quant_accuracy.py). At 1.0 clipping may cost at most what rounding
    costs; KL still decides among the candidates that pass. The top candidate always passes.
    ``max_clip``: optionally, also no candidate that clips more than this share of the values.
    """
    h = hist.double().clone()
    nonempty = torch.nonzero(h)
    if len(nonempty) == 0:
        return torch.tensor(0.0)
    h = h[: int(nonempty[-1]) + 1]
    if zero_spike and len(h) > 1:
        h[0] = h[1]
    bins = len(h)
    if saturated(h):
        return torch.tensor(bins * width)
    start = min(start, bins)
    dev = h.device
    zero = h.new_zeros(1)
    csum = torch.cat([zero, torch.cumsum(h, 0)])  # csum[k] = sum(h[:k])
    cnz = torch.cat([zero, torch.cumsum((h > 0).double(), 0)])
    hlogh = torch.where(h > 0, h * torch.log(h.clamp_min(1e-300)), h.new_zeros(()))
    chl = torch.cat([zero, torch.cumsum(hlogh, 0)])
    total = csum[-1]

    i = torch.arange(start, bins + 1, device=dev)  # candidates: keep bins [0, i)
    g = torch.arange(levels + 1, device=dev).unsqueeze(0)
    edges = (g * i.unsqueeze(1) + levels - 1) // levels  # group g: bins [edges[g], edges[g + 1])
    lo, hi = edges[:, :-1], edges[:, 1:]
    s = csum[hi] - csum[lo]  # group counts S_g
    n = cnz[hi] - cnz[lo]  # non-empty bins per group N_g
    s_log_q = torch.where(s > 0, s * torch.log(s.clamp_min(1e-300) / n.clamp_min(1)), h.new_zeros(()))

    tail = total - csum[i]
    last = h[i - 1]
    p_last = last + tail
    sum_plogp = chl[i - 1] + torch.where(p_last > 0, p_last * torch.log(p_last.clamp_min(1e-300)), h.new_zeros(()))
    g_last = ((i - 1) * levels // i).unsqueeze(1)  # the group of bin i - 1 (not the last one when i < levels)
    s_last, n_last = s.gather(1, g_last).squeeze(1), n.gather(1, g_last).squeeze(1)
    q_last = torch.where(n_last > 0, s_last / n_last.clamp_min(1), h.new_zeros(()))
    sum_plogq = s_log_q.sum(1) + torch.where(tail > 0, tail * torch.log(q_last.clamp_min(1e-300)), h.new_zeros(()))
    q_total = csum[i]
    kl = (sum_plogp - sum_plogq) / total - torch.log(total) + torch.log(q_total.clamp_min(1e-300))
    kl = torch.where((tail > 0) & (last == 0), torch.full_like(kl, float("inf")), kl)
    centers = torch.arange(bins, device=dev, dtype=h.dtype) + 0.5  # in bins, as the candidates
    c1 = torch.cat([zero, torch.cumsum(h * centers, 0)])
    c2 = torch.cat([zero, torch.cumsum(h * centers**2, 0)])
    a = i.double()
    clip_err = (c2[-1] - c2[i]) - 2 * a * (c1[-1] - c1[i]) + a * a * tail  # sum over the tail of (c - a)^2
    round_err = (a / (levels - 1)) ** 2 / 12 * csum[i]
    refused = clip_err > max_clip_error * round_err  # the top candidate has no tail: never refused
    if max_clip is not None:
        refused |= tail > max_clip * total
    kl = torch.where(refused, torch.full_like(kl, float("inf")), kl)
    best = len(kl) - 1 - int(torch.argmin(kl.flip(0)))  # the last of equal minima
    return (i[best].double() * width).float().reshape(())


SPIKE_SHARE = 1e-3
SPIKE_RATIO = 8.0
SPIKE_WINDOW = 16


def saturated(hist: torch.Tensor) -> bool:
    """The last bin of ``hist`` (trimmed to its last non-empty bin) is a saturation spike."""
    if len(hist) < 2:
        return False
    top = float(hist[-1])
    below = float(hist[-1 - SPIKE_WINDOW: -1].max())
    return top >= SPIKE_SHARE * float(hist.sum()) and top >= SPIKE_RATIO * max(below, 1.0)


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
