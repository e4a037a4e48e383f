"""lctrain: training long-context hybrid linear/full-attention language models."""

__version__ = "0.1.0"
