"""Evaluation: `python -m lctrain eval PATH --task {ppl,passkey,niah,mqar}` (see `command`).

Modules: `target` (path -> model, tokenizer, config), `generate` (greedy decoding through the cache),
`perplexity` (sliding windows), `passkey`, `niah` (+ heatmap), `mqar`, `retrieval` (scoring decoded answers),
`report` (table, JSON, TensorBoard).
"""
