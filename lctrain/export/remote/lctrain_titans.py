"""`titans` mixer of an lctrain export (Behrouz, Zhong & Mirrokni, 2024): a neural long-term memory trained online
while the sequence is read, combined with attention by `variant`:
  * "mac" (memory as context): each segment of `segment_len` tokens reads the memory as it stood at the segment
    start, attends causally over [persistent | readouts | segment], writes the attention output into the memory
    and gates it with the updated memory's readout;
  * "mag" (memory as gate): sliding-window attention (persistent tokens as always-visible sinks) gated by the
    memory branch;
  * "mal" (memory as layer): the memory alone.
Memory keys/queries are SiLU + L2-normalised; alpha (forget), eta (momentum), theta (step) are per-token, per-head
sigmoids. `memory_depth` 1 is a linear memory [K, V] per head, 2 an MLP silu(x W1) W2 from learned W1, W2.

Decoding keeps the layer's inputs so far and recomputes the layer on all of them (exact, O(T) per token), as
lctrain's own decoding does. In a padded batch each row is computed on its real tokens alone (padding outputs 0).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .lctrain_blocks import RMSNorm, rotate
from .lctrain_ops import local_attention, mlp_memory_read, titans_memory


class Titans(nn.Module):
    def __init__(self, config, layer_idx, opts):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.variant = opts.get("variant", "mac")
        self.chunk_size, self.memory_depth = opts["chunk_size"], opts["memory_depth"]
        self.segment_len, self.window = opts["segment_len"], opts["window"]
        self.theta = opts.get("rope_theta") or config.rope_theta
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        inner = self.n_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.mem_qkv = nn.Linear(d, 3 * inner, bias=False)
        self.mem_gates = nn.Linear(d, 3 * self.n_heads, bias=True)  # alpha, eta, theta logits
        self.mem_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        if self.memory_depth == 2:
            hidden = opts["memory_hidden"]
            self.mem_w1 = nn.Parameter(torch.zeros(self.n_heads, self.head_dim, hidden))
            self.mem_w2 = nn.Parameter(torch.zeros(self.n_heads, hidden, self.head_dim))
        self.persistent = nn.Parameter(torch.zeros(opts["persistent_tokens"], d))
        if self.variant != "mal":
            self.attn_qkv = nn.Linear(d, 3 * inner, bias=False)
            self.attn_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        if self.variant == "mac":
            self.mem_read_q = nn.Linear(d, inner, bias=False)
            self.readout_proj = nn.Linear(inner, d, bias=False)
            self.attn_out = nn.Linear(inner, d, bias=False)
        self.o_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x, ctx, cache):
        history = x
        if cache is not None:
            entry = cache.layer(self.layer_idx)
            history = x if "inputs" not in entry else torch.cat([entry["inputs"], x], dim=1)
            entry["inputs"] = history.detach()
        if not ctx.padded:
            return self._documents(history)[:, -x.shape[1]:]
        out = torch.zeros_like(history)
        for row in range(history.shape[0]):  # rows have different real lengths: one document each
            real = ctx.key_valid[row]
            out[row, real] = self._documents(history[row, real][None])[0]
        return out[:, -x.shape[1]:]

    # ------------------------------------------------------------------------------------------------ memory
    def _heads(self, x):
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def _heads_qkv(self, fused):
        return tuple(self._heads(part) for part in fused.chunk(3, dim=-1))

    def _initial_state(self, rows, like):
        if self.memory_depth == 1:
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            zeros = like.new_zeros((rows, self.n_heads, self.head_dim, self.head_dim), dtype=dtype)
            return zeros, zeros
        weights = tuple(w.unsqueeze(0).expand(rows, *w.shape) for w in (self.mem_w1, self.mem_w2))
        return weights, tuple(torch.zeros_like(w) for w in weights)

    def _memory(self, x, state):
        """Write x [N, L, D] into the memory from `state`: readouts [N, L, H, V] after each token, final state."""
        q, k, v = self._heads_qkv(self.mem_qkv(x))
        q, k = F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1)
        gate_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # gates never in half precision
        gates = torch.sigmoid(self.mem_gates(x).to(gate_dtype)).unflatten(-1, (3, self.n_heads))
        alpha, eta, theta = gates.unbind(-2)
        return titans_memory(q, k, v, alpha, eta, theta, self.chunk_size, state, self.memory_depth == 2)

    def _read(self, state, q):
        """Readout of `state` (not updated) for queries q [N, L, H, K] -> [N, L, H, V]."""
        if self.memory_depth == 2:
            weights = tuple(w.unsqueeze(1) for w in state[0])  # broadcast over positions
            return mlp_memory_read(weights, q.to(weights[0].dtype)).to(q.dtype)
        return torch.einsum("nlhk,nhkv->nlhv", q, state[0].to(q.dtype))

    # ------------------------------------------------------------------------------------------------ variants
    def _documents(self, x):
        """Every row of x [N, L, D] is one document starting at position 0."""
        rows, length, _ = x.shape
        if length == 0:
            return x
        if self.variant == "mac":
            return self._memory_as_context(x)
        prefix = self.persistent.shape[0]
        with_persistent = torch.cat([self.persistent.to(x.dtype).expand(rows, -1, -1), x], dim=1)
        memory_out, _ = self._memory(with_persistent, self._initial_state(rows, x))
        memory_out = self.mem_norm(memory_out[:, prefix:])
        if self.variant == "mal":
            return self.o_proj(memory_out.flatten(2))
        q, k, v = self._heads_qkv(self.attn_qkv(with_persistent))
        positions = torch.arange(prefix + length, device=x.device).expand(rows, -1)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        attended = local_attention(q, k, v, self.window, prefix, self.scale)[:, prefix:]
        return self.o_proj((self.attn_norm(attended) * torch.sigmoid(memory_out)).flatten(2))

    def _memory_as_context(self, x):
        rows, length, _ = x.shape
        prefix = self.persistent.shape[0]
        state = self._initial_state(rows, x)
        outputs = []
        for start in range(0, length, self.segment_len):
            segment = x[:, start:start + self.segment_len]
            size = segment.shape[1]
            read_q = F.normalize(F.silu(self._heads(self.mem_read_q(segment))), dim=-1)
            readouts = self.readout_proj(self._read(state, read_q).flatten(2))  # [N, S, D]
            tokens = torch.cat([self.persistent.to(x.dtype).expand(rows, -1, -1), readouts, segment], dim=1)
            q, k, v = self._heads_qkv(self.attn_qkv(tokens))
            # Positions: persistent tokens at 0, readout j and segment token j both at j + 1.
            local = torch.arange(1, size + 1, device=x.device)
            positions = torch.cat([local.new_zeros(prefix), local, local]).expand(rows, -1)
            q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
            # Segment token i sees every persistent token, readouts j <= i and segment tokens j <= i.
            causal = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
            mask = torch.cat([causal.new_ones(size, prefix), causal, causal], dim=1)
            attended = F.scaled_dot_product_attention(
                q[:, -size:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                scale=self.scale).transpose(1, 2)
            attended = self.attn_norm(attended)
            memory_out, state = self._memory(self.attn_out(attended.flatten(2)), state)
            outputs.append(attended * torch.sigmoid(self.mem_norm(memory_out)))
        return self.o_proj(torch.cat(outputs, dim=1).flatten(2))
