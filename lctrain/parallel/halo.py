"""Halo exchange for short causal convolutions across sequence shards.

A causal conv of width k at the first token of a chunk needs the k-1 tokens before it, which live at the end
of the previous chunk in global order (another rank, or for zigzag sometimes this rank). `sp_short_conv_halo`
fetches them point-to-point (zeros where they belong to another document or precede the sequence start);
backward sends the halo's gradient back to the tokens it came from. Traffic is counted as `conv`.
"""
from __future__ import annotations

import torch

from lctrain.parallel import comm
from lctrain.parallel.sharding import SPPlacement

KIND = "conv"


def _transfers(placement: SPPlacement) -> list[tuple[int, int, int, int]]:
    """(src rank, src local chunk, dst rank, dst local chunk) for every chunk with a predecessor, global order."""
    owner = {}
    for rank in range(placement.sp_size):
        for local, chunk in enumerate(placement.chunk_ids_of(rank)):
            owner[chunk] = (rank, local)
    return [owner[j - 1] + owner[j] for j in range(1, placement.num_chunks)]


def _halo_mask(placement: SPPlacement, width: int) -> torch.Tensor:
    """bool `[B, n_local, width]`: halo token i of local chunk l is from the same document as the chunk start."""
    c = placement.chunk_size
    rows = placement.doc_ids.shape[0]
    masks = []
    for chunk in placement.chunk_ids:
        start = chunk * c
        index = torch.arange(start - width, start, device=placement.doc_ids.device)
        valid = index >= 0
        docs = placement.doc_ids[:, index.clamp(min=0)]
        masks.append(valid[None] & (docs == placement.doc_ids[:, start:start + 1]))
    return torch.stack(masks, dim=1) if masks else torch.zeros(rows, 0, width, dtype=torch.bool)


def _move(pieces: torch.Tensor, placement: SPPlacement, reverse: bool) -> torch.Tensor:
    """Forward: tails of local chunks `[B, n_local, w, ...]` -> halos of local chunks (predecessor's tail).
    Reverse: halo gradients -> gradients of the local tails they were copied from."""
    rank = placement.sp_rank
    out = torch.zeros_like(pieces)
    sends, recvs, local_copies = [], [], []
    for src, src_local, dst, dst_local in _transfers(placement):
        if reverse:                       # gradients travel from the halo's reader back to the tail's owner
            src, src_local, dst, dst_local = dst, dst_local, src, src_local
        if src == rank and dst == rank:
            local_copies.append((src_local, dst_local))
        elif src == rank:
            sends.append((pieces[:, src_local].contiguous(), dst))
        elif dst == rank:
            buffer = torch.empty_like(pieces[:, dst_local], memory_format=torch.contiguous_format)
            recvs.append((buffer, src, dst_local))
    comm.exchange(sends, [(b, s) for b, s, _ in recvs], placement.groups, KIND)
    for buffer, _, dst_local in recvs:
        out[:, dst_local] += buffer
    for src_local, dst_local in local_copies:
        out[:, dst_local] += pieces[:, src_local]
    return out


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, placement: SPPlacement, width: int):
        rows, c = x_local.shape[0], placement.chunk_size
        chunks = x_local.reshape((rows, -1, c) + tuple(x_local.shape[2:]))
        mask = _halo_mask(placement, width).to(x_local.dtype)
        mask = mask.reshape(mask.shape + (1,) * (x_local.dim() - 2))
        halo = _move(chunks[:, :, c - width:], placement, reverse=False) * mask
        ctx.placement, ctx.width, ctx.shape = placement, width, x_local.shape
        ctx.save_for_backward(mask)
        return halo

    @staticmethod
    def backward(ctx, grad_halo):
        (mask,) = ctx.saved_tensors
        placement, width, shape = ctx.placement, ctx.width, ctx.shape
        c = placement.chunk_size
        grad_tails = _move((grad_halo * mask).contiguous(), placement, reverse=True)
        grad = grad_halo.new_zeros((shape[0], shape[1] // c, c) + tuple(shape[2:]))
        grad[:, :, c - width:] = grad_tails
        return grad.reshape(shape), None, None


def sp_short_conv_halo(x_local: torch.Tensor, kernel_size: int, placement: SPPlacement) -> torch.Tensor:
    """The `kernel_size - 1` tokens before each local chunk, from the same document.

    x_local `[B, T_local, ...]` -> halo `[B, n_local_chunks, kernel_size - 1, ...]` (n_local_chunks = 1 for
    contiguous, 2 for zigzag). Collective over the SP group. Needs `kernel_size - 1 <= chunk_size`.
    """
    if not isinstance(placement, SPPlacement):
        raise ValueError(f"sp_short_conv_halo: placement must be an SPPlacement, got {type(placement)}")
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"sp_short_conv_halo: kernel_size must be a positive int, got {kernel_size!r}")
    width = kernel_size - 1
    if width > placement.chunk_size:
        raise ValueError(f"sp_short_conv_halo: kernel_size - 1 = {width} exceeds the chunk size "
                         f"{placement.chunk_size}; use fewer SP ranks or a longer sequence")
    if x_local.dim() < 2 or x_local.shape[1] != placement.local_len or x_local.shape[0] != placement.position_ids.shape[0]:
        raise ValueError(f"sp_short_conv_halo: expected x_local [B={placement.position_ids.shape[0]}, "
                         f"T_local={placement.local_len}, ...], got {tuple(x_local.shape)}")
    if width == 0:
        return x_local.new_zeros((x_local.shape[0], len(placement.chunk_ids), 0) + tuple(x_local.shape[2:]))
    return _Halo.apply(x_local, placement, width)


def extend_with_halo(x_local: torch.Tensor, halo: torch.Tensor, placement: SPPlacement):
    """Rows a mixer can run its document-aware causal conv on, one row per local chunk.

    Returns `x_ext [B * n_local, k - 1 + c, ...]` = cat(halo, chunk) and `position_ids_ext [B * n_local, k - 1 + c]`
    (halo tokens count as the continuation of the chunk's first document; masked halo tokens are zero, so they
    add nothing). After the conv, `drop_halo` removes the first k - 1 outputs.
    """
    rows, c, width = x_local.shape[0], placement.chunk_size, halo.shape[2]
    chunks = x_local.reshape((rows, -1, c) + tuple(x_local.shape[2:]))
    x_ext = torch.cat([halo, chunks], dim=2).reshape((-1, width + c) + tuple(x_local.shape[2:]))
    positions = placement.position_ids.reshape(rows, -1, c)
    halo_positions = positions.new_ones(rows, positions.shape[1], width)
    position_ids_ext = torch.cat([halo_positions, positions], dim=2).reshape(-1, width + c)
    return x_ext, position_ids_ext


def sp_short_conv(conv, x_local: torch.Tensor, placement: SPPlacement, kernel_size: int | None = None) -> torch.Tensor:
    """Run a document-aware causal conv on this rank's tokens as if it saw the whole sequence.

    conv: callable `conv(x [N, c, C], position_ids [N, c], prefix=[N, k-1, C]) -> [N, c, C]` that continues
    from `prefix` (the inputs just before x, zeros where nothing continues), e.g.
    `lctrain.models.shortconv.ShortConvolution`; `kernel_size` defaults to `conv.kernel_size`.
    x_local `[B, T_local, C]` -> `[B, T_local, C]`. Every local chunk becomes one row, so one conv call serves
    both zigzag chunks. Collective over the SP group.
    """
    kernel_size = kernel_size if kernel_size is not None else getattr(conv, "kernel_size", None)
    if kernel_size is None:
        raise ValueError("sp_short_conv: pass kernel_size= or a conv with a .kernel_size attribute")
    halo = sp_short_conv_halo(x_local, kernel_size, placement)                  # [B, n, k-1, C]
    rows, c = x_local.shape[0], placement.chunk_size
    x_rows = x_local.reshape((-1, c) + tuple(x_local.shape[2:]))
    positions = placement.position_ids.reshape(-1, c)
    prefix = halo.reshape((-1, kernel_size - 1) + tuple(x_local.shape[2:]))
    y = conv(x_rows, positions, prefix=prefix)
    return y.reshape((rows, placement.local_len) + tuple(y.shape[2:]))


def drop_halo(y_ext: torch.Tensor, kernel_size: int, placement: SPPlacement) -> torch.Tensor:
    """`[B * n_local, k - 1 + c, ...]` conv outputs -> `[B, T_local, ...]` for the local tokens."""
    rows = placement.position_ids.shape[0]
    return y_ext[:, kernel_size - 1:].reshape((rows, placement.local_len) + tuple(y_ext.shape[2:]))
