"""Modeling code shipped inside every hybrid export (copied verbatim next to `config.json`).

These files must run where lctrain is not installed: they import only torch and transformers, and use
lctrain's (or fla's) kernels only when those happen to be importable.
"""
