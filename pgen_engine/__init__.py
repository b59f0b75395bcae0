"""pgen_engine: personalized multimodal content generation with Janus-style models.

Public API::

    import pgen_engine as pg
    model = pg.load_model("/path/to/Janus-Pro-1B", device="cuda", dtype=torch.bfloat16)
    logits = model.text_logits(input_ids, attention_mask)
"""
from .generation import Generator
from .models import CheckpointError, JanusModel, KVCache, SpecialTokens, load_model

__version__ = "0.1.0"

__all__ = ["load_model", "Generator", "JanusModel", "KVCache", "SpecialTokens", "CheckpointError", "__version__"]
