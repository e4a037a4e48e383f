"""Decoding state of an lctrain export, as a transformers `Cache` (the way Qwen3-Next and Mamba-style models keep
hybrid states): one `LayerState` per layer holding that mixer's tensors (attention keys/values, recurrent states,
convolution inputs, Titans inputs), plus, for the whole model, the position and padding flag of every token
consumed so far. Every tensor is batch-first, so beam search and batch selection reorder all of them alike.
"""
import torch
from transformers.cache_utils import Cache


def _map(value, fn):
    """Apply fn to every tensor of a value that may be a tensor or (nested) tuples of tensors."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, fn) for v in value)
    return value


class LayerState(dict):
    """One layer's named tensors, batch first. Implements the per-layer methods `Cache` delegates to."""

    is_compileable = False  # shapes change with the padding and the sliding window
    is_sliding = False
    is_croppable = False
    supports_early_init = False
    is_initialized = True

    def _apply(self, fn):
        for key in list(self):
            self[key] = _map(self[key], fn)

    def reorder_cache(self, beam_idx):
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._apply(lambda t: t[indices])

    def reset(self):
        self.clear()

    def crop(self, tokens_to_remove):
        raise ValueError("LctrainCache cannot be cropped: recurrent layers keep no per-token history to roll back "
                         "(assisted/speculative decoding is not supported)")

    def offload(self):
        pass

    def prefetch(self):
        pass

    def get_max_length(self):
        return -1


class LctrainCache(Cache):
    """Per-layer decoding state plus `positions` [B, seen] (long) and `valid` [B, seen] (bool, False at padding)
    of every token the model has consumed."""

    def __init__(self, num_layers):
        layers = [LayerState() for _ in range(num_layers)]
        try:
            super().__init__(layers=layers)
        except TypeError:  # transformers before 4.56: Cache() takes no arguments
            super().__init__()
            self.layers = layers
        self.positions = None
        self.valid = None
        self.has_padding = False  # host flag: whether any consumed token was padding

    def layer(self, idx):
        return self.layers[idx]

    @property
    def seen_tokens(self):
        return 0 if self.positions is None else self.positions.shape[1]

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.seen_tokens + query_length, 0

    def next_positions(self, batch, device):
        """Position of the next real token of each row: the number of real tokens consumed. [B] long."""
        if self.valid is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.valid.sum(dim=1)

    def record(self, positions, valid):
        """Append the positions [B, T] and padding flags [B, T] of the tokens a forward call consumed."""
        positions, valid = positions.detach(), valid.detach()
        if self.positions is None:
            self.positions, self.valid = positions, valid
        else:
            self.positions = torch.cat([self.positions, positions], dim=1)
            self.valid = torch.cat([self.valid, valid], dim=1)

    def _history(self, fn):
        if self.positions is not None:
            self.positions, self.valid = fn(self.positions), fn(self.valid)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._history(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self._history(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._history(lambda t: t[indices])

    def reset(self):
        super().reset()
        self.positions = self.valid = None
        self.has_padding = False
