import dataclasses

import numpy as np
import pytest
import torch

from pgen_engine.generation import SamplingParams, SamplingParamsError


def test_defaults_and_normalisation():
    p = SamplingParams(guidance_scale=3, temperature=np.float32(0.5), top_k=np.int64(7), seed=np.int64(5))
    assert (p.guidance_scale, p.temperature, p.top_k, p.top_p, p.greedy) == (3.0, 0.5, 7, 1.0, False)
    assert isinstance(p.top_k, int) and isinstance(p.guidance_scale, float)
    assert SamplingParams(seed=2 ** 64 - 1).seed == -1  # uint64 values wrap to int64 like the sampler's seeds
    assert SamplingParams(seed=[1, 2, 3]).seed == (1, 2, 3)
    assert SamplingParams(seed=torch.tensor([4, 5])).seed == (4, 5)
    assert SamplingParams(guidance_scale=1.0).cfg is False and SamplingParams().cfg is True


def test_frozen_and_replace_revalidates():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 3
    assert p.replace(top_k=5).top_k == 5
    with pytest.raises(SamplingParamsError, match="top_k"):
        p.replace(top_k=-1)


@pytest.mark.parametrize("kw,field", [
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed=-(2 ** 63) - 1), "seed"),
    (dict(seed=[]), "seed"),
])
def test_out_of_range_values_name_the_field(kw, field):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw)
    assert e.value.field == field and field in str(e.value)


@pytest.mark.parametrize("kw", [dict(top_k=2.5), dict(top_k=True), dict(temperature="1"), dict(greedy="yes"),
                                dict(seed=1.5), dict(seed=[1, "2"])])
def test_wrong_types_raise_type_error(kw):
    with pytest.raises(TypeError):
        SamplingParams(**kw)


def test_per_prompt_seed_count_is_checked():
    assert SamplingParams(seed=[1, 2]).request_seeds(2) == (1, 2)
    assert SamplingParams(seed=9).request_seeds(5) == 9
    with pytest.raises(SamplingParamsError, match="one per prompt"):
        SamplingParams(seed=[1, 2]).request_seeds(3)
