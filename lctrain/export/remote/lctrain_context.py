"""What every mixer of an lctrain export needs to know about the tokens of one forward call: their positions,
which of them are padding, and the same for every token the cache has already consumed.

Padding may sit anywhere (left padding for batched generation, right padding for training); a padding token is
never read by a real token and never changes a recurrent state. Positions count real tokens only, so a
left-padded prompt gets the positions it would have alone.
"""
import torch


class StepContext:
    """positions [B, T] long; valid [B, T] bool or None (None: no token of this call is padding);
    key_positions [B, P + T] and key_valid [B, P + T] or None (None: no padding anywhere) cover the P cached tokens
    then these; past = P."""

    def __init__(self, positions, valid, key_positions, key_valid, past):
        self.positions, self.valid = positions, valid
        self.key_positions, self.key_valid = key_positions, key_valid
        self.past = past

    @property
    def padded(self):
        """Whether any token seen so far (cached or in this call) is padding."""
        return self.key_valid is not None

    @classmethod
    def build(cls, batch, seqlen, device, attention_mask=None, position_ids=None, cache=None):
        past = cache.seen_tokens if cache is not None else 0
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be 2-D [batch, tokens] with 1 for tokens and 0 for padding; "
                                 f"got shape {tuple(attention_mask.shape)}")
            # Either the mask of the whole sequence so far (what generate passes) or of this call's tokens only.
            current = attention_mask[:, -seqlen:].to(device=device, dtype=torch.bool)
        else:
            current = torch.ones(batch, seqlen, dtype=torch.bool, device=device)
        all_real = bool(current.all())  # one host read per call: chooses the unpadded fast paths
        if position_ids is None:
            start = cache.next_positions(batch, device) if past else torch.zeros(batch, dtype=torch.long,
                                                                                 device=device)
            position_ids = (start[:, None] + current.long().cumsum(dim=1) - 1).clamp(min=0)
        else:
            position_ids = position_ids.to(device).expand(batch, seqlen)
        if past:
            key_positions = torch.cat([cache.positions, position_ids], dim=1)
            padded = cache.has_padding or not all_real
            key_valid = torch.cat([cache.valid, current], dim=1) if padded else None
        else:
            key_positions, key_valid = position_ids, (None if all_real else current)
        return cls(position_ids, None if all_real else current, key_positions, key_valid, past), current

    def causal_visible(self):
        """[B or 1, T, P + T] bool: key j is an earlier-or-same token than query i and is not padding. A padding
        query also sees itself, so no softmax row is empty (its output is never read)."""
        seqlen = self.positions.shape[1]
        total = self.key_positions.shape[1]
        device = self.positions.device
        query_slot = torch.arange(self.past, self.past + seqlen, device=device)
        key_slot = torch.arange(total, device=device)
        visible = (key_slot[None, :] <= query_slot[:, None])[None]
        if self.key_valid is not None:
            visible = (visible & self.key_valid[:, None, :]) | (key_slot[None, None, :] == query_slot[None, :, None])
        return visible
