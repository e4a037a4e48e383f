"""Distributed cases for `sp_attention` through the attention Triton kernels (interpreter, fp32): every mode and
layout against the float64 single-process reference. Slow in the interpreter, so a separate (slow) module."""
from __future__ import annotations

from tests.parallel.cases_attention import triton_case

CASES = {f"{mode}_{layout}_triton_fp32": triton_case(mode, layout)
         for mode in ("allgather", "ulysses", "ring") for layout in ("contiguous", "zigzag")}
