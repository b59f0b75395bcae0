"""Generation: the batched KV-cached image-token :class:`Generator` (CFG, sampling, waves over a
shared-prefix KV cache, decode backends chosen once in :mod:`.backends`)."""
from .generator import UNCOND_MODES, GenerationMemoryError, Generator, NonFiniteLogitsError
from .sampling_params import SamplingParams, SamplingParamsError

__all__ = ["GenerationMemoryError", "Generator", "NonFiniteLogitsError", "SamplingParams", "SamplingParamsError",
           "UNCOND_MODES"]
