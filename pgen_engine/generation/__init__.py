"""Generation: the batched KV-cached image-token :class:`Generator` (CFG, sampling) and,
in :mod:`.scheduler`, the C++ continuous-batching scheduler / KV block manager wrapper."""
from .generator import SCHEDULERS, UNCOND_MODES, Generator, NonFiniteLogitsError
from .sampling_params import SamplingParams, SamplingParamsError

__all__ = ["Generator", "NonFiniteLogitsError", "SamplingParams", "SamplingParamsError", "SCHEDULERS",
           "UNCOND_MODES"]
