"""Shared helpers of the Python tests (run against the installed `latte` package)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_FIXTURES = ROOT / "crates" / "latte-models" / "tests" / "fixtures"
EVAL_FIXTURES = ROOT / "crates" / "latte-eval" / "tests" / "fixtures"

_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "F16": np.float16}


def read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """A minimal safetensors reader (the format: u64 header length, JSON header, raw little-endian data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(raw[base + start : base + end], dtype=dtype).reshape(info["shape"])
    return out


def latte_binary() -> Path:
    """The `latte` CLI built by `cargo test --workspace` / `cargo build` (or $LATTE_BIN)."""
    env = os.environ.get("LATTE_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "latte"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def random_docs(rng: np.random.Generator, n: int, dim: int = 16, lo: int = 3, hi: int = 12):
    """`n` L2-normalised random documents of `lo..hi` tokens."""
    docs = []
    for _ in range(n):
        m = rng.standard_normal((int(rng.integers(lo, hi)), dim)).astype(np.float32)
        docs.append(m / np.linalg.norm(m, axis=1, keepdims=True))
    return docs


def maxsim(q: np.ndarray, d: np.ndarray) -> float:
    return float((q @ d.T).max(axis=1).sum())
