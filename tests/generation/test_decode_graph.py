"""The static (CUDA-graph-ready) decode step: same tokens as the eager loop, graph bookkeeping.

CUDA graphs themselves need a GPU (``benchmarks/gpu_generation.py`` checks graph == eager ==
transformers there); on CPU the capture is replaced by a recorder that replays the step, so
the bookkeeping around it (one eager warm-up step, replays per wave, re-use across calls,
re-capture when shapes, sampling settings or parameter addresses change) is tested here.
"""
from __future__ import annotations

import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator
from pgen_engine.generation import decode_graph as dg
from pgen_engine.models.tiny import make_tiny_checkpoint
from tests.generation._host_sync import forbid_host_reads

SPECIAL = pg.SpecialTokens.builtin()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("graph") / "m", seed=3, init_std=0.2, image_size=32,
                                patch_size=8, num_heads=4, num_kv_heads=2)
    return pg.load_model(path)


def _prompts(model, lens, seed=0, images=(0,)):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lens):
        r = [SPECIAL.bos] + torch.randint(6, 300, (n,), generator=g).tolist()
        for _ in range(images[i % len(images)]):
            r += [SPECIAL.boi] + [SPECIAL.image] * model.num_image_tokens + [SPECIAL.eoi]
        rows.append(r + [SPECIAL.boi])
    n_img = sum(images[i % len(images)] for i in range(len(lens)))
    px = torch.rand(n_img, 3, model.image_size, model.image_size, generator=g) * 2 - 1 if n_img else None
    return rows, px


@pytest.mark.parametrize("kw", [dict(greedy=True, guidance_scale=3.0),
                                dict(top_k=12, top_p=0.9, temperature=0.7, guidance_scale=5.0),
                                dict(guidance_scale=1.0, top_k=0),
                                dict(greedy=True, guidance_scale=2.0, uncond_mode="short")])
def test_static_step_gives_the_eager_tokens(model, kw):
    kw = dict(kw)
    mode = kw.pop("uncond_mode", "pad")
    rows, px = _prompts(model, [3, 9, 1, 5], seed=7, images=(1, 0))
    S = max(map(len, rows))
    eager = Generator(model, max_batch_size=5, max_seq_len=S + model.num_image_tokens, uncond_mode=mode,
                      decode_mode="eager")
    static = Generator(model, max_batch_size=5, max_seq_len=S + model.num_image_tokens, uncond_mode=mode,
                       decode_mode="static")
    a = eager.generate(rows, pixel_values=px, num_samples=2, seed=11, **kw)  # 8 rows -> waves of 5 and 3
    b = static.generate(rows, pixel_values=px, num_samples=2, seed=11, **kw)
    assert torch.equal(a, b), f"{(a != b).sum()} of {a.numel()} tokens differ"
    assert static.generate(rows, pixel_values=px, num_samples=2, seed=11, **kw).equal(a)  # buffers re-used


class _Recorder:
    """Stands in for a CUDA graph on CPU: capture records the step, replay runs it."""

    captures = 0
    replays = 0

    def __init__(self, step):
        self.step = step

    def replay(self):
        _Recorder.replays += 1
        self.step()

    @classmethod
    def capture(cls, step):
        step()  # the real capture runs one warm-up step for real, then records without running
        cls.captures += 1
        return cls(step)


def test_graph_bookkeeping_replays_and_recaptures(model, monkeypatch):
    monkeypatch.setattr(dg.StaticDecode, "_capture", staticmethod(_Recorder.capture))
    _Recorder.captures = _Recorder.replays = 0
    T = model.num_image_tokens
    rows, _ = _prompts(model, [4, 6, 2], seed=1)
    eager = Generator(model, max_batch_size=4, max_seq_len=32, decode_mode="eager")
    g = Generator(model, max_batch_size=4, max_seq_len=32, decode_mode="static")
    g._static = dg.StaticDecode(graphs=True)  # what decode_mode="graph" builds on CUDA
    kw = dict(num_samples=2, seed=5, top_k=10, top_p=0.95)
    want = eager.generate(rows, **kw)  # 6 rows -> waves of 4 and 2
    assert torch.equal(g.generate(rows, **kw), want)
    assert (_Recorder.captures, _Recorder.replays) == (2, 2 * (T - 2))  # one graph per wave shape
    assert torch.equal(g.generate(rows, **kw), want)  # same shapes: replays only
    assert (_Recorder.captures, _Recorder.replays) == (2, 2 * (T - 2) + 2 * (T - 1))
    g.generate(rows, num_samples=2, seed=5, top_k=3)  # other sampling settings: new graphs
    assert _Recorder.captures == 4
    assert len(g._static._cache) == 4
    # parameters moved to new storage (a reload): a graph would read freed memory -> re-capture
    p = model.generation_head.vision_head.weight
    old = p.data
    try:
        p.data = p.data.clone()
        assert torch.equal(g.generate(rows, **kw), want)
        assert _Recorder.captures == 6
    finally:
        p.data = old
    g.reset_graphs()
    assert not g._static._cache


def test_graph_cache_is_bounded(model, monkeypatch):
    monkeypatch.setattr(dg.StaticDecode, "_capture", staticmethod(_Recorder.capture))
    g = Generator(model, max_batch_size=2, max_seq_len=32, decode_mode="static")
    g._static = dg.StaticDecode(graphs=True)
    for k in range(dg.MAX_GRAPHS + 3):
        g.generate([[SPECIAL.bos, 7, SPECIAL.boi]], top_k=k + 1)
    assert len(g._static._cache) == dg.MAX_GRAPHS


def test_static_loop_never_synchronises_with_the_host(model, monkeypatch):
    g = Generator(model, max_batch_size=4, max_seq_len=32, decode_mode="static")
    trap = {"on": False, "steps": 0}
    real = dg.decode_step

    def step(*a, **k):
        trap["on"] = True
        trap["steps"] += 1
        try:
            return real(*a, **k)
        finally:
            trap["on"] = False

    monkeypatch.setattr(dg, "decode_step", step)
    forbid_host_reads(monkeypatch, lambda: trap["on"], "inside the static decode step")
    out = g.generate([[SPECIAL.bos, 40, 41, SPECIAL.boi]], num_samples=3, top_k=5, top_p=0.9, seed=2)
    assert out.shape == (3, model.num_image_tokens)
    assert trap["steps"] == model.num_image_tokens - 1


def test_decode_mode_validation(model):
    assert dg.resolve_decode_mode("auto", torch.device("cpu")) == "eager"
    assert dg.resolve_decode_mode("auto", torch.device("cuda")) == "graph"
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        Generator(model, decode_mode="fast")
    with pytest.raises(ValueError, match="needs a CUDA model"):
        Generator(model, decode_mode="graph")


@pytest.mark.parametrize("kw", [dict(top_k=12, top_p=0.9, temperature=0.7, guidance_scale=5.0),
                                dict(greedy=True, guidance_scale=1.0, temperature=1.3)])
def test_logprobs_are_recorded_inside_the_step(model, monkeypatch, kw):
    """return_logprobs: same codes as without, identical log-probs from eager, static and
    (recorded) graph decode, and each equals log_softmax(cond logits / T) of its code."""
    monkeypatch.setattr(dg.StaticDecode, "_capture", staticmethod(_Recorder.capture))
    rows, px = _prompts(model, [3, 9, 1], seed=4, images=(1, 0))
    S = max(map(len, rows))
    gens = {m: Generator(model, max_batch_size=4, max_seq_len=S + model.num_image_tokens, decode_mode=m)
            for m in ("eager", "static")}
    gens["graph"] = Generator(model, max_batch_size=4, max_seq_len=S + model.num_image_tokens, decode_mode="static")
    gens["graph"]._static = dg.StaticDecode(graphs=True)
    plain = gens["eager"].generate(rows, pixel_values=px, num_samples=2, seed=3, **kw)
    got = {m: g.generate(rows, pixel_values=px, num_samples=2, seed=3, return_logprobs=True, **kw)
           for m, g in gens.items()}
    for m, (codes, lp) in got.items():
        assert torch.equal(codes, plain), m
        assert lp.dtype == torch.float32 and lp.shape == codes.shape and bool((lp <= 0).all()), m
        # eager runs the C++ wave loop on CPU (rows grouped per thread differently from the
        # static step's decode_layers_cpu): sums may round in another order
        torch.testing.assert_close(lp, got["eager"][1], rtol=1e-5, atol=1e-5, msg=m)
    assert torch.equal(got["graph"][1], got["static"][1])  # the same step, recorded
    # teacher-forced reference for sample 0 of prompt 1 (a text-only prompt)
    codes, lp = got["eager"]
    r = 2
    ids = torch.tensor([rows[1]])
    with torch.no_grad():
        logits = model.image_logits(ids, codes[r:r + 1])  # [1, T, K] conditional logits
    ref = torch.log_softmax(logits.float() / kw["temperature"], -1).gather(2, codes[r:r + 1, :, None])[0, :, 0]
    torch.testing.assert_close(lp[r], ref, rtol=1e-4, atol=1e-4)
