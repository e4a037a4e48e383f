"""H2O KV-cache eviction for decoding (Zhang et al., 2023): each kv head keeps at most `budget` cached entries, the
`recent` newest ones plus the "heavy hitters", the entries with the largest attention mass accumulated so far.

Used by the decoding cache of the `attn` mixer (`lctrain.models.kv_cache`) when a budget is set (`set_kv_budget`,
`eval --kv-budget`), so memory per layer stays constant however long the prompt and the generation. Entries are
chosen per kv head (the query heads of a GQA group pool their scores), so heads may keep different positions; keys
are cached after RoPE, so a kept key needs no position bookkeeping beyond the recency ranking.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def set_kv_budget(lm, budget: int | None, recent: int | None = None) -> None:
    """Give every `attn` layer of `lm` an H2O budget (None: keep every entry). `recent` defaults to budget / 2.
    A layer takes part when its mixer has a `kv_budget` attribute (no import of the mixer: it imports this)."""
    if budget is not None and (budget < 2 or (recent is not None and not 0 <= recent < budget)):
        raise ValueError(f"kv budget {budget} / recent {recent}: expected budget >= 2 and 0 <= recent < budget")
    for layer in lm.layers:
        if hasattr(layer.mixer, "kv_budget"):
            layer.mixer.kv_budget = None if budget is None else (budget, budget // 2 if recent is None else recent)


def h2o_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, entry: dict, budget: int, recent: int,
               scale: float) -> torch.Tensor:
    """Attend new queries q `[B, n, H, D]` (k, v `[B, n, Hkv, D]`, one document per row) to the kept cache and
    themselves, then evict down to `budget` entries per kv head. Returns `[B, n, H, D]`."""
    batch, new, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    seen = entry.get("seen", 0)
    # Cache layout per kv head: keys/values [B, Hkv, S, D], accumulated score and absolute position [B, Hkv, S].
    keys = torch.cat([entry["k"], k.transpose(1, 2)], dim=2) if "k" in entry else k.transpose(1, 2)
    values = torch.cat([entry["v"], v.transpose(1, 2)], dim=2) if "v" in entry else v.transpose(1, 2)
    new_pos = torch.arange(seen, seen + new, device=q.device).expand(batch, kv_heads, new)
    positions = torch.cat([entry["pos"], new_pos], dim=2) if "pos" in entry else new_pos
    scores = entry.get("score", keys.new_zeros(batch, kv_heads, 0, dtype=torch.float32))
    scores = torch.cat([scores, scores.new_zeros(batch, kv_heads, new)], dim=2)

    qg = q.transpose(1, 2).reshape(batch, kv_heads, group * new, dim)  # a GQA group's queries share its cache
    logits = qg @ keys.transpose(-1, -2)  # [B, Hkv, group*n, S], softmax in at least fp32
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    query_pos = (seen + torch.arange(new, device=q.device)).repeat(group)
    visible = positions[:, :, None, :] <= query_pos[None, None, :, None]
    probs = F.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    out = (probs.to(values.dtype) @ values).view(batch, kv_heads, group, new, -1)
    scores = scores + probs.sum(dim=2).float()

    size = keys.shape[2]
    if size > budget:
        # Keep the `recent` newest entries and the best-scoring others.
        rank_new = positions.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = newest
        is_recent = rank_new < recent
        keep_score = torch.where(is_recent, torch.full_like(scores, float("inf")), scores)
        kept = keep_score.topk(budget, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, budget]
        gather = kept[..., None].expand(-1, -1, -1, keys.shape[-1])
        keys, values = keys.gather(2, gather), values.gather(2, kept[..., None].expand(-1, -1, -1, values.shape[-1]))
        scores, positions = scores.gather(2, kept), positions.gather(2, kept)
    entry.update(k=keys.detach(), v=values.detach(), score=scores.detach(), pos=positions, seen=seen + new)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, new, heads, -1)
