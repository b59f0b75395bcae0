"""Data-layer throughput: PatchKMeans tokenization (images/s) and SFT loader (samples/s).

Run: ``python -m pytest benchmarks/test_bench_data.py -q`` (add ``-s`` for the JSON line).
"""
import json

import numpy as np
import pytest
import torch

from pgen_engine.data.dataset import load_dataset, load_image
from pgen_engine.data.prompts import PromptBuilder, SFTDataset, build_sft_loader
from pgen_engine.data.splits import build_splits
from pgen_engine.data.synth import SynthConfig, generate_synthetic
from pgen_engine.data.text_tokenizer import ByteTokenizer
from pgen_engine.data.token_cache import build_token_cache
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer

RESULTS = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate_synthetic(root / "ds", SynthConfig(num_users=200, num_items=256, seed=0))
    ds = load_dataset(root / "ds")
    imgs = torch.from_numpy(np.stack([load_image(it.image_path, 32) for it in ds.items.values()]))
    tok = PatchKMeansTokenizer.fit(imgs[:64], patch_size=4, codebook_size=256, iters=5, seed=0)
    cache = build_token_cache(ds, tok, root / "cache", progress=False)
    return ds, imgs, tok, cache


def test_bench_patch_kmeans_encode(benchmark, setup):
    _, imgs, tok, _ = setup
    out = benchmark(tok.encode, imgs)
    assert out.shape == (256, 64)
    RESULTS["patch_kmeans_encode_images_per_s"] = imgs.shape[0] / benchmark.stats.stats.mean


def test_bench_sft_loader(benchmark, setup):
    ds, _, tok, cache = setup
    sp = build_splits(ds, k=4)
    data = SFTDataset(sp.train, cache, PromptBuilder(ByteTokenizer(), ByteTokenizer().special, tok.num_tokens))
    special = ByteTokenizer().special

    def run():
        n = 0
        for b in build_sft_loader(data, special, batch_size=16, seed=0, cond_dropout_p=0.1):
            n += b["input_ids"].shape[0]
        return n

    n = benchmark.pedantic(run, rounds=2, iterations=1)
    RESULTS["sft_loader_samples_per_s"] = n / benchmark.stats.stats.mean
    print(json.dumps({"bench": "data", **{k: round(v, 1) for k, v in RESULTS.items()}}))
