"""A tiny checkpoint of a named geometry, loaded by the engine and by transformers (built once)."""
from __future__ import annotations

import torch

import pgen_engine as pg
from pgen_engine.models.special_tokens import SpecialTokens
from pgen_engine.models.tiny import make_tiny_checkpoint

_BUILT: dict[str, tuple] = {}


def build_pair(tmp_path_factory, name: str, geometry: dict) -> tuple:
    """(engine model, transformers model) of ``make_tiny_checkpoint(**geometry)``, cached by ``name``
    for the session (the seed and init are fixed: names must be unique across test modules)."""
    if name not in _BUILT:
        from benchmarks.hf_janus import load_hf_janus  # late import: image generate ready on this transformers

        path = make_tiny_checkpoint(tmp_path_factory.mktemp("geom") / name, seed=3, init_std=0.2, **geometry)
        _BUILT[name] = (pg.load_model(path), load_hf_janus(path))
    return _BUILT[name]


def ragged_prompts(seed: int, lens: list[int], special: SpecialTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[bos, text..., boi]`` prompts of these lengths (a 1-token prompt is ``[boi]``)
    and their attention mask, both ``[len(lens), max(lens)]``."""
    gen = torch.Generator().manual_seed(seed)
    S = max(lens)
    ids = torch.full((len(lens), S), special.pad, dtype=torch.long)
    mask = torch.zeros((len(lens), S), dtype=torch.long)
    for b, n in enumerate(lens):
        row = [special.boi] if n == 1 else [special.bos, *torch.randint(6, 300, (n - 2,), generator=gen).tolist(),
                                            special.boi]
        ids[b, S - n:] = torch.tensor(row)
        mask[b, S - n:] = 1
    return ids, mask
