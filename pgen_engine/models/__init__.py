"""Models: the engine's Janus implementation, checkpoint I/O and image tokenizers."""
from .checkpoint import load_model, save_checkpoint
from .decoder import KVCache
from .janus import JanusModel
from .janus_config import CheckpointError, JanusModelConfig
from .special_tokens import SpecialTokens

__all__ = ["load_model", "save_checkpoint", "KVCache", "JanusModel", "CheckpointError", "JanusModelConfig",
           "SpecialTokens"]
