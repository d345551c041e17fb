"""Conversions of PyLate-style array inputs into what the native module reads in place."""

from __future__ import annotations

from typing import Any, List

import numpy as np


def matrix(x: Any, what: str) -> np.ndarray:
    """One ``tokens × dim`` float32 C-contiguous matrix (no copy when ``x`` already is one)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (tokens × dim), got shape {a.shape}")
    return a


def matrices(x: Any, what: str) -> List[np.ndarray]:
    """A list of matrices from a list of 2-D arrays or one 3-D array (a single 2-D array is one item)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().float().numpy()
    if isinstance(x, np.ndarray):
        if x.ndim == 2:
            return [matrix(x, what)]
        if x.ndim == 3:
            return [matrix(row, f"{what}[{i}]") for i, row in enumerate(x)]
        raise ValueError(f"{what}: expected a 2-D or 3-D array, got shape {x.shape}")
    return [matrix(item, f"{what}[{i}]") for i, item in enumerate(x)]
