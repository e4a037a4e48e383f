"""MoA (Mixture of Sparse Attention): elastic per-head attention spans chosen by a profile-guided MILP.

Each attention head gets a rule S_h(N) = alpha_h + beta_h * N: a sliding window of that many tokens (the token
itself included) plus `sink` initial tokens, for input length N (semantics of `lctrain.kernels.local_attention`).

Modules: `rules` (the `Rule` type, the default rule grid, mask density and masks), `plan` (the JSON plan file:
save, load, validate, per-layer head windows), `profile` (gradient-based loss profile of every rule on every
head), `search` (the MILP over the profile that picks one rule per head under a density budget) and `command`
(`python -m lctrain moa {profile,search} ...`).
"""
