"""What an `attention` call attends to, as host values, and the document bounds of its tokens.

A call covers queries at global indices `[q_offset, q_offset + Tq)` and keys at `[k_offset, k_offset + Tk)` of
one row (the block form; the plain form has both offsets 0 and Tq == Tk). Query i sees key j iff

    j and i lie in the same document, j <= i (causal), and (no window, or i - j < W_h, or j - doc_start < S_h)

with per-head window W_h and sink S_h. Documents come from the host offsets (`cu_seqlens_cpu`, global indices
of the row, B == 1) or, without them, every row is one document starting at 0. Which keys a block of queries can
reach is decided here from host values alone (`key_ranges`), so no path reads a device tensor back.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import torch

NO_END = 2 ** 62  # document end of a row without offsets


@dataclass(frozen=True)
class Pattern:
    """causal; windows / sinks: per-head ints (`()` = no window / no sink); scale; q_offset / k_offset: global
    index of the first query / key; offsets: host document offsets of the row or None (one document per row)."""

    causal: bool
    windows: tuple[int, ...]
    sinks: tuple[int, ...]
    scale: float
    q_offset: int = 0
    k_offset: int = 0
    offsets: tuple[int, ...] | None = None

    @property
    def widest(self) -> int | None:
        return max(self.windows) if self.windows else None

    @property
    def deepest(self) -> int:
        return max(self.sinks) if self.sinks and self.windows else 0

    def document_of(self, index: int) -> tuple[int, int]:
        """(start, end) of the document holding global index `index`."""
        if self.offsets is None:
            return 0, NO_END
        n = bisect_right(self.offsets, index) - 1
        n = min(max(n, 0), len(self.offsets) - 2)
        return self.offsets[n], self.offsets[n + 1]

    def key_ranges(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> list[tuple[int, int]]:
        """Disjoint global key ranges, inside `[k_lo, k_hi)`, that the queries `[q_lo, q_hi)` may see (a superset
        of the exact rule, which is applied as a mask): the band from the first query's document start (or its
        window) to the last query, and the first document's sink keys before the band. Later documents of the
        block start inside it, so their sinks lie in the band."""
        if q_hi <= q_lo or k_hi <= k_lo:
            return []
        first_start, _ = self.document_of(q_lo)
        hi = q_hi if self.causal else self.document_of(q_hi - 1)[1]
        ranges = []
        if self.windows:
            band_lo = max(first_start, q_lo - self.widest + 1)
            if self.deepest:
                ranges.append((first_start, min(first_start + self.deepest, band_lo)))
        else:
            band_lo = first_start
        ranges.append((band_lo, hi))
        out = []
        for lo, hi in ranges:
            lo, hi = max(lo, k_lo), min(hi, k_hi)
            if lo < hi:
                out.append((lo, hi))
        return out

    def sees_any(self, q_len: int, k_len: int) -> bool:
        """Whether any query of the call can see any key (host decision: a block that sees nothing is skipped)."""
        return bool(self.key_ranges(self.q_offset, self.q_offset + q_len, self.k_offset, self.k_offset + k_len))


def document_bounds(offsets: torch.Tensor | None, first: int, length: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (start, end) of the document of each index in `[first, first + length)`: two long `[length]`
    tensors on `device`. `offsets` are the document offsets of the row on that device (searched there: no
    device-to-host read) or None (one document)."""
    index = torch.arange(first, first + length, device=device)
    if offsets is None:
        return torch.zeros_like(index), torch.full_like(index, NO_END)
    offsets = offsets.to(device=device, dtype=torch.long)
    doc = (torch.searchsorted(offsets, index, right=True) - 1).clamp(0, offsets.numel() - 2)
    return offsets[doc], offsets[doc + 1]


def allowed(pattern: Pattern, q_index: torch.Tensor, q_start: torch.Tensor, k_index: torch.Tensor,
            k_start: torch.Tensor) -> torch.Tensor:
    """bool `[Hm, Tq, Tk]` (Hm = 1, or H with per-head spans that differ): which pairs may attend."""
    mask = q_start[:, None] == k_start[None, :]
    if pattern.causal:
        mask = mask & (k_index[None, :] <= q_index[:, None])
    if not pattern.windows:
        return mask[None]
    device = q_index.device
    uniform = len(set(pattern.windows)) == 1 and len(set(pattern.sinks or (0,))) == 1
    windows = torch.tensor(pattern.windows[:1] if uniform else pattern.windows, device=device)[:, None, None]
    sinks = pattern.sinks or (0,) * len(pattern.windows)
    sinks = torch.tensor(sinks[:1] if uniform else sinks, device=device)[:, None, None]
    near = (q_index[:, None] - k_index[None, :])[None] < windows
    sink = (k_index - k_start)[None, None, :] < sinks
    return mask[None] & (near | sink)
