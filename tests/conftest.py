"""Shared fixtures: tiny random Janus checkpoints written by ``transformers`` itself."""
from __future__ import annotations

import os
from pathlib import Path

# Triton decides at @triton.jit time whether a kernel runs in its CPU interpreter, so the
# switch must be set before anything imports pgen_engine.ops (conftest runs first). On a
# GPU machine the variable is left alone and the compiled kernels are tested.
if os.environ.get("PGEN_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-layer GQA tiny Janus checkpoint (hidden 64, 4 heads / 2 kv heads, 16 image tokens)."""
    from pgen_engine.models.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    import pgen_engine as pg

    return pg.load_model(tiny_ckpt)


@pytest.fixture(scope="session")
def tiny_hf(tiny_ckpt):
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(tiny_ckpt).eval()


def shared_data_dir() -> Path | None:
    """``../shared/data`` next to the repo (or $PGEN_SHARED_DIR/data), if present."""
    base = Path(os.environ["PGEN_SHARED_DIR"]) if os.environ.get("PGEN_SHARED_DIR") else REPO.parent / "shared"
    d = base / "data"
    return d if d.is_dir() else None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
