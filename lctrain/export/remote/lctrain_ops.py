"""Sequence-mixing ops of an lctrain export, in plain PyTorch, with lctrain's (or fla's) kernels used instead
when they can be imported (set LCTRAIN_HF_KERNELS=torch to force the PyTorch forms below).

Layout `[B, T, H, D]` throughout; recurrent states are fp32 (float64 for float64 inputs) and use the same layout
as lctrain's kernels, so a state from either path continues in the other.
"""
import os

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- optional kernels
def _optional_kernels():
    """(lctrain ops, fla ops) that can be imported here; either may be empty or partial."""
    if os.environ.get("LCTRAIN_HF_KERNELS") == "torch":
        return {}, {}
    own, fla = {}, {}
    # One try per op: a build without one kernel still uses the others.
    try:
        from lctrain.kernels import gated_delta_rule, linear_attention
        own.update(gdn=gated_delta_rule, linear=linear_attention)
    except Exception:
        pass
    try:
        from lctrain.kernels.local_attention import local_attention
        own["swa"] = local_attention
    except Exception:
        pass
    try:
        from lctrain.kernels.taylor_linear_attention import taylor_linear_attention
        own["based"] = taylor_linear_attention
    except Exception:
        pass
    try:
        from lctrain.kernels.landmark_attention import landmark_attention
        own["landmark"] = landmark_attention
    except Exception:
        pass
    try:
        from lctrain.kernels.titans_memory import titans_linear_memory
        from lctrain.kernels.titans_memory.mlp import mlp_titans_memory
        own.update(titans_linear=titans_linear_memory, titans_mlp=mlp_titans_memory)
    except Exception:
        pass
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla
        fla = {"gdn": chunk_gated_delta_rule, "linear": chunk_simple_gla}
    except Exception:
        pass
    return own, fla


_OWN, _FLA = _optional_kernels()


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- gdn, linear
def torch_gated_delta_rule(q, k, v, g, beta, scale, state):
    """Token-by-token recurrence in fp32. q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H], state [B, H, K, V]
    or None. Returns o [B, T, H, V] and the final state."""
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    if state is None:
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t].exp()[..., None, None]
        remembered = torch.einsum("bhk,bhkv->bhv", k[:, t], state)  # (I - beta k k^T) S = S - beta k (k^T S)
        state = state + beta[:, t, :, None, None] * k[:, t, :, :, None] * (v[:, t] - remembered)[:, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def torch_linear_attention(q, k, v, log_decay, scale, state):
    """Token-by-token recurrence in fp32 with a per-head decay log_decay [H] or a per-token one [B, T, H]."""
    q, k, v = q.float(), k.float(), v.float()
    if state is None:
        state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if log_decay.dim() == 1:
        log_decay = log_decay[None, None, :].expand(q.shape[0], q.shape[1], -1)
    decay = log_decay.float().exp()[..., None, None]  # [B, T, H, 1, 1]
    outputs = []
    for t in range(q.shape[1]):
        state = decay[:, t] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state


def gated_delta_rule(q, k, v, g, beta, state):
    scale = q.shape[-1] ** -0.5
    if q.shape[1] == 1:  # a decoding step: one recurrence step beats any chunked kernel's set-up
        return torch_gated_delta_rule(q, k, v, g, beta, scale, state)
    if "gdn" in _OWN:
        return _OWN["gdn"](q, k, v, g=g, beta=beta, scale=scale, initial_state=state, output_final_state=True)
    if "gdn" in _FLA and q.is_cuda:
        return _FLA["gdn"](q, k, v, g=g, beta=beta, scale=scale, initial_state=state, output_final_state=True)
    return torch_gated_delta_rule(q, k, v, g, beta, scale, state)


def linear_attention(q, k, v, log_decay, state):
    """log_decay [H] (per head) or [B, T, H] (per token)."""
    scale = q.shape[-1] ** -0.5
    if q.shape[1] == 1:  # a decoding step
        return torch_linear_attention(q, k, v, log_decay, scale, state)
    if "linear" in _OWN:
        return _OWN["linear"](q, k, v, log_decay=log_decay, scale=scale, initial_state=state,
                              output_final_state=True)
    if "linear" in _FLA and q.is_cuda:
        g = log_decay.float()
        g = (g if g.dim() == 3 else g[None, None, :].expand(q.shape[0], q.shape[1], -1)).contiguous()
        return _FLA["linear"](q, k, v, g=g, scale=scale, initial_state=state, output_final_state=True)
    return torch_linear_attention(q, k, v, log_decay, scale, state)


# ---------------------------------------------------------------------------------------------- sliding window
def windowed_attention(q, k, v, query_pos, key_pos, window, sink, scale):
    """Softmax attention where a query at position i sees a key at position j iff j <= i and (i - j < window or
    j < sink). q [B, n, H, D]; k, v [B, m, Hkv, D] (Hkv divides H); query_pos [n], key_pos [m] long.
    Builds an [n, m] mask: use for decoding steps, or as the reference when lctrain's kernel is absent."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    gap = query_pos[:, None] - key_pos[None, :]
    mask = (gap >= 0) & ((gap < window) | (key_pos[None, :] < sink))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def masked_attention(q, k, v, visible, scale):
    """Softmax attention of q [B, n, H, D] over k, v [B, m, Hkv, D] (Hkv divides H) where `visible` [B or 1, n, m]
    (bool) says which keys each query sees; `visible=None` is plain causal attention with n == m."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    mask = visible[:, None] if visible is not None else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=visible is None, scale=scale)
    return out.transpose(1, 2)


def local_attention(q, k, v, window, sink, scale):
    """Sliding-window attention over whole sequences (one per row, starting at position 0)."""
    if "swa" in _OWN:
        return _OWN["swa"](q, k, v, window, sink, scale)
    positions = torch.arange(q.shape[1], device=q.device)
    return windowed_attention(q, k, v, positions, positions, window, sink, scale)


# ---------------------------------------------------------------------------------------------- Taylor (BASED)
def taylor_features(x, scale=None):
    """Key features [1, k, vec(k k^T)], or with `scale` query features [1, s q, (s^2 / 2) vec(q q^T)]:
    [..., D] -> [..., 1 + D + D^2]; their dot product is 1 + x + x^2 / 2 with x = scale q.k (BASED's score)."""
    half = 1.0
    if scale is not None:
        x, half = x * scale, 0.5
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2)
    return torch.cat([x.new_ones(*x.shape[:-1], 1), x, half * outer], dim=-1)


def torch_taylor_linear_attention(q, k, v, state, eps=1e-6, chunk=64, keep=None):
    """BASED linear attention, chunk by chunk: polynomial scores inside a chunk, the running moment state
    S = sum_s phi_k(k_s) [v_s, 1]^T across chunks. q, k [B, T, H, D], v [B, T, H, V], state [B, H, F, V + 1]
    or None (F = 1 + D + D^2); keep [B, T] bool or None: tokens with keep False (padding) add nothing.
    Returns o [B, T, H, V] = numerator / (normaliser + eps) and the final state."""
    compute = _compute_dtype(q)
    scale = q.shape[-1] ** -0.5
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # the ones column accumulates the normaliser
    if keep is not None:
        values = values * keep[:, :, None, None].to(compute)
    if state is None:
        rows = 1 + q.shape[-1] + q.shape[-1] ** 2
        state = q.new_zeros(q.shape[0], q.shape[2], rows, values.shape[-1])
    state = state.to(compute)
    pieces = []
    for start in range(0, q.shape[1], chunk):
        part = slice(start, start + chunk)
        qc, kc, vc = q[:, part], k[:, part], values[:, part]
        x = scale * torch.einsum("bthd,bshd->bhts", qc, kc)
        causal = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).tril()
        scores = (1 + x + 0.5 * x * x) * causal
        y = torch.einsum("bhts,bshv->bthv", scores, vc)
        y = y + torch.einsum("bthf,bhfv->bthv", taylor_features(qc, scale), state)
        pieces.append(y)
        state = state + torch.einsum("bthf,bthv->bhfv", taylor_features(kc), vc)
    y = torch.cat(pieces, dim=1)
    value_dim = v.shape[-1]
    return y[..., :value_dim] / (y[..., value_dim:] + eps), state


def taylor_linear_attention(q, k, v, state, keep=None):
    if keep is not None or q.shape[1] == 1:  # padding (only this form leaves tokens out), or a decoding step
        o, state = torch_taylor_linear_attention(q, k, v, state, keep=keep)
        return o.to(q.dtype), state
    if "based" in _OWN:
        return _OWN["based"](q, k, v, initial_state=state, output_final_state=True)
    o, state = torch_taylor_linear_attention(q, k, v, state)
    return o.to(q.dtype), state


# ---------------------------------------------------------------------------------------------- landmark
def torch_landmark_attention(q, k, v, start, block_size, scale):
    """Landmark attention (the training-time grouped softmax) for queries at positions start .. start + n - 1 of
    one sequence per row. q [B, n, H, D]; k [B, start + n, H, D], v [B, start + n, H, V] (every key so far).

    Query i in block b: one softmax over its own block's non-landmark keys j <= i and the landmark keys of the
    earlier blocks gives own-block weights and a gate per earlier block; each earlier block's non-landmark keys
    then share their gate through a softmax of their own. Builds [n, start + n] scores. Returns [B, n, H, V]."""
    compute = _compute_dtype(q)
    count, total = q.shape[1], k.shape[1]
    query_pos = torch.arange(start, start + count, device=q.device)
    key_pos = torch.arange(total, device=q.device)
    query_block, key_block = query_pos // block_size, key_pos // block_size
    is_landmark = key_pos % block_size == block_size - 1
    own = ((key_block[None, :] == query_block[:, None]) & (key_pos[None, :] <= query_pos[:, None])
           & ~is_landmark[None, :])
    earlier_landmark = is_landmark[None, :] & (key_block[None, :] < query_block[:, None])
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(compute) * scale, k.to(compute))
    group = torch.softmax(scores.masked_fill(~(own | earlier_landmark), float("-inf")), dim=-1)
    values = v.to(compute)
    out = torch.einsum("bhnm,bmhv->bnhv", group * own, values)
    blocks = total // block_size  # complete blocks: the only ones that can precede a query's block
    if blocks:
        span = blocks * block_size
        members = scores[..., :span].unflatten(-1, (blocks, block_size))[..., :-1]  # [B, H, n, c, L-1]
        gates = group[..., :span].unflatten(-1, (blocks, block_size))[..., -1]  # zero unless block c < b
        member_values = values[:, :span].unflatten(1, (blocks, block_size))[:, :, :-1]  # [B, c, L-1, H, V]
        weights = members.softmax(dim=-1) * gates.unsqueeze(-1)
        out = out + torch.einsum("bhncl,bclhv->bnhv", weights, member_values)
    return out.to(q.dtype)


def positional_landmark_attention(q, k, v, query_pos, key_pos, visible, block_size, scale):
    """The same grouped softmax for rows whose tokens carry their own positions (padded batches). q [B, n, H, D];
    k, v [B, m, H, .] (heads already repeated); query_pos [B, n], key_pos [B, m] (block = position // block_size,
    landmark = the last position of a block); visible [B, n, m] bool (causal and not padding). Per-block softmaxes
    are segment reductions over the key axis, so no row needs the same layout. Returns [B, n, H, V]."""
    compute = _compute_dtype(q)
    lowest = torch.finfo(compute).min
    query_block, key_block = query_pos // block_size, key_pos // block_size
    is_landmark = (key_pos % block_size == block_size - 1)[:, None, :]
    same_block = key_block[:, None, :] == query_block[:, :, None]
    earlier_block = key_block[:, None, :] < query_block[:, :, None]
    own = (visible & same_block & (key_pos[:, None, :] <= query_pos[:, :, None]) & ~is_landmark)[:, None]
    earlier_landmark = (visible & earlier_block & is_landmark)[:, None]
    members = (visible & earlier_block & ~is_landmark)[:, None]  # [B, 1, n, m]
    scores = torch.einsum("bnhd,bmhd->bhnm", q.to(compute) * scale, k.to(compute))
    allowed = own | earlier_landmark
    group = torch.softmax(scores.masked_fill(~allowed, lowest), dim=-1) * allowed
    # Each earlier block's members share their landmark's weight through a softmax of their own.
    blocks = int(key_block.max()) + 1
    index = key_block.clamp(min=0)[:, None, None, :].expand_as(scores)
    member_scores = scores.masked_fill(~members, lowest)
    block_max = scores.new_full((*scores.shape[:-1], blocks), lowest).scatter_reduce(
        -1, index, member_scores, reduce="amax")
    weights = (member_scores - block_max.gather(-1, index)).exp() * members
    totals = scores.new_zeros(*scores.shape[:-1], blocks).scatter_add(-1, index, weights)
    gates = scores.new_zeros(*scores.shape[:-1], blocks).scatter_add(-1, index, group * earlier_landmark)
    weights = weights / totals.gather(-1, index).clamp_min(torch.finfo(compute).tiny) * gates.gather(-1, index)
    out = torch.einsum("bhnm,bmhv->bnhv", group * own + weights, v.to(compute))
    return out.to(q.dtype)


def landmark_attention(q, k, v, start, block_size, scale):
    if start == 0 and "landmark" in _OWN:
        return _OWN["landmark"](q, k, v, block_size, scale)
    return torch_landmark_attention(q, k, v, start, block_size, scale)


# ---------------------------------------------------------------------------------------------- Titans memory
def _titans_step(memory, momentum, surprise, alpha, eta, theta):
    """S_t = eta_t S_{t-1} - theta_t u_t, M_t = (1 - alpha_t) M_{t-1} + S_t; gates [B, H], tensors [B, H, ...]."""
    spread = (1,) * (memory.dim() - 2)
    momentum = eta.view(*eta.shape, *spread) * momentum - theta.view(*theta.shape, *spread) * surprise
    memory = (1 - alpha).view(*alpha.shape, *spread) * memory + momentum
    return memory, momentum


def torch_titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size, state):
    """Titans linear memory M [K, V] per head, trained online. Inside each chunk the surprise is measured against
    the chunk-start memory M0: u_t = k_t (M0^T k_t - v_t)^T, S_t = eta_t S_{t-1} - theta_t u_t,
    M_t = (1 - alpha_t) M_{t-1} + S_t, o_t = q_t^T M_t. q, k [B, T, H, K], v [B, T, H, V], gates [B, T, H];
    state (M, S) each [B, H, K, V] or None. Returns o [B, T, H, V] and (M, S)."""
    compute = _compute_dtype(q)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    alpha, eta, theta = alpha.to(compute), eta.to(compute), theta.to(compute)
    if state is None:
        zeros = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        state = (zeros, zeros)
    memory, momentum = (s.to(compute) for s in state)
    outputs = []
    for start in range(0, q.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        error = torch.einsum("bthk,bhkv->bthv", k[:, part], memory) - v[:, part]
        surprises = k[:, part, :, :, None] * error[:, :, :, None, :]  # [B, C, H, K, V]
        for i, t in enumerate(range(start, min(start + chunk_size, q.shape[1]))):
            memory, momentum = _titans_step(memory, momentum, surprises[:, i], alpha[:, t], eta[:, t], theta[:, t])
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], memory))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o, (memory, momentum)


def mlp_memory_read(weights, x):
    """f_W(x) = silu(x W1) W2 per head: x [..., K], W1 [..., K, F], W2 [..., F, V] with matching leading dims."""
    hidden = F.silu((x.unsqueeze(-2) @ weights[0]).squeeze(-2))
    return (hidden.unsqueeze(-2) @ weights[1]).squeeze(-2)


def _mlp_surprises(w1, w2, k, v):
    """Gradients of 1/2 ||silu(k W1) W2 - v||^2 w.r.t. W1 and W2 at the chunk-start weights, for every token of
    a chunk (written out by hand: no autograd inside inference). w1 [B, H, K, F], w2 [B, H, F, V]; k [B, C, H, K],
    v [B, C, H, V]. Returns [B, C, H, K, F] and [B, C, H, F, V]."""
    pre = torch.einsum("bchk,bhkf->bchf", k, w1)
    gate = torch.sigmoid(pre)
    hidden = pre * gate
    error = torch.einsum("bchf,bhfv->bchv", hidden, w2) - v
    d_hidden = torch.einsum("bchv,bhfv->bchf", error, w2)
    d_pre = d_hidden * gate * (1 + pre * (1 - gate))  # silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
    return k[..., :, None] * d_pre[..., None, :], hidden[..., :, None] * error[..., None, :]


def torch_titans_mlp_memory(q, k, v, alpha, eta, theta, chunk_size, state):
    """Titans deep memory: the same update as the linear memory on both weights of f_W(x) = silu(x W1) W2.
    state ((W1, W2), (S1, S2)) with W1 [B, H, K, F], W2 [B, H, F, V]. Returns o [B, T, H, V] and the state."""
    compute = _compute_dtype(q)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    alpha, eta, theta = alpha.to(compute), eta.to(compute), theta.to(compute)
    weights = [w.to(compute) for w in state[0]]
    momenta = [s.to(compute) for s in state[1]]
    outputs = []
    for start in range(0, q.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        surprises = _mlp_surprises(weights[0], weights[1], k[:, part], v[:, part])
        for i, t in enumerate(range(start, min(start + chunk_size, q.shape[1]))):
            for j in range(2):
                weights[j], momenta[j] = _titans_step(weights[j], momenta[j], surprises[j][:, i], alpha[:, t],
                                                      eta[:, t], theta[:, t])
            outputs.append(mlp_memory_read(weights, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    return o, (tuple(weights), tuple(momenta))


def titans_memory(q, k, v, alpha, eta, theta, chunk_size, state, deep):
    """Write a sequence into the Titans memory (`deep`: the MLP memory, state required); o in q's dtype."""
    if deep:
        if "titans_mlp" in _OWN:
            return _OWN["titans_mlp"](q, k, v, alpha, eta, theta, chunk_size, state)
        o, state = torch_titans_mlp_memory(q, k, v, alpha, eta, theta, chunk_size, state)
        return o.to(q.dtype), state
    if "titans_linear" in _OWN:
        return _OWN["titans_linear"](q, k, v, alpha, eta, theta, chunk_size=chunk_size, initial_state=state,
                                     output_final_state=True)
    o, state = torch_titans_linear_memory(q, k, v, alpha, eta, theta, chunk_size, state)
    return o.to(q.dtype), state
