"""KV-cache bytes of the rollout's Generator, sized by the Generator itself on the meta model."""
from __future__ import annotations

from pgen_engine.generation.generator import Generator


def rollout_kv_bytes(model, rows: int, max_seq_len: int, uncond_mode: str, num_samples: int = 1,
                     guidance_scale: float = 5.0) -> int:
    """KV-cache bytes the rollout's Generator holds for ``rows`` output rows: ``rows //
    num_samples`` prompts of ``max_seq_len - num_image_tokens`` tokens, ``num_samples`` each.

    Constructs the real :class:`pgen_engine.generation.Generator` on the meta model (nothing
    is allocated) and asks it (:meth:`~pgen_engine.generation.Generator.kv_bytes`: the wave
    plan and sizing code its calls run, with a prompt's samples and identical unconditional
    prompts sharing their K/V). This is the one place the planner sizes the cache; it builds
    the Generator exactly as :meth:`pgen_engine.training.rollout.HybridEngine.rollout` does.
    """
    gen = Generator(model, max_batch_size=rows, max_seq_len=max_seq_len, uncond_mode=uncond_mode,
                    decode_mode="eager")
    plen = max_seq_len - model.num_image_tokens
    # RL prompts are history prompts: their interior begin-of-image tokens stay in the "pad"
    # unconditional prompt, so prompts of one length may each have their own (the upper bound)
    return int(gen.kv_bytes([plen] * max(1, rows // num_samples), num_samples=num_samples,
                            guidance_scale=guidance_scale, distinct_uncond=True))
