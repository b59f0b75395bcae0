"""Shared fixtures for the data tests: a small synthetic dataset and the MovieLens path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgen_engine.data.synth import SynthConfig, generate_synthetic

REPO = Path(__file__).resolve().parents[2]


def movielens_dir() -> Path:
    base = Path(os.environ["PGEN_SHARED_DIR"]) if os.environ.get("PGEN_SHARED_DIR") else REPO.parent / "shared"
    return base / "data" / "movielens-posters"


@pytest.fixture(scope="session")
def movielens() -> Path:
    d = movielens_dir()
    if not (d / "interactions.csv").is_file():
        pytest.skip(f"movielens-posters not found at {d} (set PGEN_SHARED_DIR)")
    return d


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_synthetic(out, SynthConfig(num_users=23, num_items=57, seed=5))
    return out
