"""Converting a pretrained transformer into a hybrid, and distilling it back to the original.

- `layers`: the target pattern and the initialisation of new linear-family layers from attention weights.
- `distill`: the teacher and the chunked KL + cross-entropy loss (no `[T, vocab]` logits of either model).
- `calibrate`: per-head output scales of the new layers, fitted in closed form on one batch.
- `align`: the optional first stage, each new layer's output regressed onto the attention output it replaces.
"""
