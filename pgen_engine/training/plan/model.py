"""The run's model on the ``meta`` device: its geometry (checkpoint ``config.json``, a run's
resolved config, a released model's reference geometry, or the tiny ``model.init`` model),
cast to the run's precision with its trainable groups set."""
from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from pgen_engine.config import RunConfig
from pgen_engine.models.janus import JanusModel
from pgen_engine.models.janus_config import JanusModelConfig
from pgen_engine.models.tiny import tiny_janus_config
from pgen_engine.training.engine import set_trainable
from pgen_engine.training.plan.report import PlanError


# Released Janus-Pro geometries (their Hugging Face config.json values), used only when a
# config's checkpoint is not on disk yet and its path names one of them.
REFERENCE_GEOMETRIES: dict[str, dict] = {
    "Janus-Pro-1B": dict(
        text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=102400,
                         max_position_embeddings=16384),
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                           patch_size=16, projection_dim=2048, intermediate_size=4096, num_image_tokens=576),
        vq_config=dict(projection_dim=2048, image_token_embed_dim=2048),
        image_token_id=100581, tie_word_embeddings=False),
    "Janus-Pro-7B": dict(
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=102400,
                         max_position_embeddings=16384),
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                           patch_size=16, projection_dim=4096, intermediate_size=4096, num_image_tokens=576),
        vq_config=dict(projection_dim=4096, image_token_embed_dim=4096),
        image_token_id=100581, tie_word_embeddings=False),
}


def reference_geometry(name: str):
    """The :class:`JanusModelConfig` of a released model in :data:`REFERENCE_GEOMETRIES`."""
    from transformers import JanusConfig  # late import: transformers is heavy and only this fallback needs it

    return JanusModelConfig.from_dict(JanusConfig(**REFERENCE_GEOMETRIES[name]).to_dict(), source=name)


def _named_geometry(path: str) -> str | None:
    key = re.sub(r"[^a-z0-9]", "", path.lower())
    hits = [n for n in REFERENCE_GEOMETRIES if re.sub(r"[^a-z0-9]", "", n.lower()) in key]
    return hits[0] if len(hits) == 1 else None


def resolve_model_config(cfg: RunConfig):
    """-> (JanusModelConfig, description) of the model ``cfg`` trains.

    ``model.checkpoint`` with a ``config.json``: that. A checkpoint written by an earlier run
    that does not exist yet (``<run>/final``): that run's ``config.resolved.yaml`` is
    followed when present. Otherwise, a path naming a released model (``Janus-Pro-1B``,
    ``janus_pro_7b_sft/final`` ...) uses its reference geometry, said so in the
    description. ``model.checkpoint: null``: the tiny model the run would initialise from
    ``model.init`` and the data tokenizer's geometry.

    Raises:
        PlanError: a checkpoint that is neither on disk nor a known model.
    """
    if cfg.model.checkpoint is None:
        d, init = cfg.data, cfg.model.init
        tc = tiny_janus_config(**init.geometry(), image_size=d.tokenizer_image_size, patch_size=d.patch_size,
                               codebook_size=d.codebook_size)
        return JanusModelConfig.from_dict(tc.to_dict(), "model.init"), "tiny model from model.init"
    path = Path(cfg.model.checkpoint)
    for _ in range(4):  # follow at most a few run -> SFT run links
        if (path / "config.json").is_file():
            return JanusModelConfig.from_dir(path), f"{path} (config.json)"
        resolved = path.parent / "config.resolved.yaml"
        if not resolved.is_file():
            break
        nxt = ((yaml.safe_load(resolved.read_text()) or {}).get("model") or {}).get("checkpoint")
        if not nxt:
            break
        path = Path(nxt)
    name = _named_geometry(str(cfg.model.checkpoint)) or _named_geometry(str(path))
    if name is None:
        raise PlanError(f"model.checkpoint={cfg.model.checkpoint}: no config.json there, and the path names none of "
                        f"the known models ({', '.join(REFERENCE_GEOMETRIES)}); point it at a checkpoint folder")
    return reference_geometry(name), f"{name} reference geometry ({cfg.model.checkpoint} is not on disk)"


def meta_model(model_config, dtype: torch.dtype, trainable: list[str]):
    """The run's JanusModel on the meta device in ``dtype``, trainable groups set, train mode."""
    with torch.device("meta"):
        model = JanusModel(model_config)
    model = model.to(dtype)
    set_trainable(model, trainable)
    model.train()
    return model


def unique_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters with tied tensors once (DeepSpeed partitions each tensor once)."""
    seen: set[int] = set()
    out = []
    for n, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out
