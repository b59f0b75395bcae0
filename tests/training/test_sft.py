"""SFT objective, trainable groups, init-for-tokenizer, resume resolution, metrics log."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pgen_engine.config import ModelInitConfig
from pgen_engine.data.prompts import PromptBuilder, SFTCollator, TrainingSample
from pgen_engine.data.text_tokenizer import ByteTokenizer
from pgen_engine.models import SpecialTokens, load_model
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.training.checkpoints import META
from pgen_engine.training.engine import parameter_group, set_trainable
from pgen_engine.training.init import init_model_for_tokenizer, tokenizer_geometry
from pgen_engine.training.metrics import MetricsLogger, read_metrics
from pgen_engine.training.resume import ResumeError, resolve_resume
from pgen_engine.training.engine import ObjectiveModule
from pgen_engine.training.sft import sft_loss

K, T = 37, 16  # odd codebook; 32 px / 8 px -> 16 codes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "m", seed=3, codebook_size=K, hidden_size=48,
                                num_heads=4, num_kv_heads=2, intermediate_size=80)
    return load_model(path).train()


def _batch(gen: torch.Generator, B: int = 3) -> dict[str, torch.Tensor]:
    special = SpecialTokens.builtin()
    builder = PromptBuilder(ByteTokenizer(special), special, T, instruction="next?")
    samples = []
    for b in range(B):
        n = int(torch.randint(1, 4, (), generator=gen))  # different history lengths -> left padding
        hist = torch.randint(0, K, (n, T), generator=gen)
        samples.append(TrainingSample(builder.build(hist), torch.randint(0, K, (T,), generator=gen)))
    return SFTCollator(special)(samples)


def _naive_loss(model, batch) -> torch.Tensor:
    x = model.embed_inputs(batch["input_ids"], batch["gen_code_mask"])
    h = model.forward_train(x, batch["attention_mask"], batch["position_ids"])
    logits = model.image_head_logits(h).float()
    m = batch["loss_mask"]
    return torch.nn.functional.cross_entropy(logits[m], batch["labels"][m])


def test_sft_loss_matches_naive_cross_entropy_and_grads(model):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    batch = _batch(gen)
    assert int(batch["loss_mask"].sum()) == 3 * T  # every target code, nothing else
    model.zero_grad()
    loss, n = sft_loss(model, batch)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = _naive_loss(model, batch)
    ref.backward()
    assert int(n) == 3 * T
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    w = "generation_head.vision_head.weight"
    torch.testing.assert_close(got[w], model.get_parameter(w).grad, rtol=1e-4, atol=1e-6)
    assert "lm_head.weight" not in got  # the text head plays no part in the image loss


@pytest.mark.parametrize("seed", [0, 1, 360])
def test_sft_loss_ignores_prompt_and_padding(model, seed):
    # fixed seeds: 360 is one where the batch-mean loss did not move when every sample's history
    # changed (the random tiny model's per-sample changes, ~1e-5, cancelled in the mean)
    gen = torch.Generator().manual_seed(seed)
    batch = _batch(gen)
    with torch.no_grad():
        base, _ = sft_loss(model, batch)
        # the last code is an input nothing later reads (causal): changing it changes nothing
        other = {k: v.clone() for k, v in batch.items()}
        other["input_ids"][:, -1] = (other["input_ids"][:, -1] + 1) % K
        again, _ = sft_loss(model, other)
        assert torch.equal(base, again)
        # the condition matters: a different history changes each sample's loss
        hist = batch["gen_code_mask"] & ~torch.roll(batch["loss_mask"], 1, dims=1) & ~batch["loss_mask"]
        moved = {k: v.clone() for k, v in batch.items()}
        moved["input_ids"][hist] = (moved["input_ids"][hist] + 1) % K
        for b in range(batch["input_ids"].shape[0]):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            one_moved = {k: v[b:b + 1] for k, v in moved.items()}
            assert not torch.equal(sft_loss(model, one)[0], sft_loss(model, one_moved)[0]), b
        empty = {k: v.clone() for k, v in batch.items()}
        empty["loss_mask"][:] = False
    with pytest.raises(ValueError, match="no target image tokens"):
        sft_loss(model, empty)


def test_objective_module_and_trainable_groups(model):
    wrapper = ObjectiveModule(model)
    assert wrapper(lambda m, x: (m is model, x), 5) == (True, 5)
    n = set_trainable(model, ["generation_head", "aligner"])
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] in ("generation_head", "aligner")), name
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert parameter_group("vqmodel.encoder.conv_in.weight") == "vqmodel"
    with pytest.raises(ValueError, match="no known group"):
        parameter_group("mystery.weight")
    set_trainable(model, ["language_model", "aligner", "generation_aligner", "generation_embeddings",
                          "generation_head"])


def test_init_model_matches_tokenizer_and_is_reused(tmp_path):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    images = torch.randint(0, 256, (12, 32, 32, 3), generator=g, dtype=torch.uint8)
    tok = PatchKMeansTokenizer.fit(images, patch_size=8, codebook_size=23, iters=3, seed=1)
    init = ModelInitConfig(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48, num_layers=1)
    out = init_model_for_tokenizer(tmp_path / "init", tok, init)
    m = load_model(out)
    assert m.codebook_size == 23 and m.num_image_tokens == tok.num_tokens == 16 and m.image_size == 32
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert init_model_for_tokenizer(tmp_path / "init", tok, init) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    init_model_for_tokenizer(tmp_path / "init", tok, ModelInitConfig(hidden_size=32, num_heads=2, num_kv_heads=1,
                                                                     num_layers=2))
    assert load_model(out).config.text.num_layers == 2

    class Odd:
        image_size, num_tokens, codebook_size = 32, 15, 8

    with pytest.raises(ValueError, match="square grid"):
        tokenizer_geometry(Odd())
    Odd.num_tokens, Odd.image_size = 16, 24  # 6 px patches: not a power of two
    with pytest.raises(ValueError, match="power of two"):
        tokenizer_geometry(Odd())


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None
    ck = tmp_path / "checkpoints"
    for s in (3, 6):
        (ck / f"step{s:08d}").mkdir(parents=True)
        (ck / f"step{s:08d}" / META).write_text(json.dumps({"step": s}))
    (ck / "step00000009").mkdir()  # incomplete: never chosen
    assert resolve_resume("auto", tmp_path).name == "step00000006"
    (ck / "latest").write_text("step00000003\n")
    assert resolve_resume("auto", tmp_path).name == "step00000003"
    assert resolve_resume(str(ck / "step00000006"), tmp_path).name == "step00000006"
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        resolve_resume(str(ck / "step00000009"), tmp_path)


def test_metrics_logger_truncates_on_resume(tmp_path):
    log = MetricsLogger(tmp_path, is_main=True, total_steps=5, progress=False)
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s, "lr": 0.1})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a crash mid-line
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    log = MetricsLogger(tmp_path, is_main=True, total_steps=5, start_step=3, progress=False)
    log.log({"step": 4, "loss": 9.0, "lr": 0.1})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0
    quiet = MetricsLogger(tmp_path / "other", is_main=False, total_steps=5)
    quiet.log({"step": 1})
    assert not (tmp_path / "other").exists()


def test_too_few_windows_for_one_batch_is_a_data_prep_error():
    # a small dataset of the user's own (8 users x 5 interactions = 16 windows at the demo's batch
    # of 32) used to end train.py in a ValueError traceback from the batch sampler
    from pgen_engine.config import load_config
    from pgen_engine.training.sft import check_one_batch
    from pgen_engine.training.sft_data import DataPrepError

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo_sft.yaml"),
                      ["data.dataset_dir=/data/mine"])
    with pytest.raises(DataPrepError, match=r"data\.dataset_dir=/data/mine: 16 training window\(s\), fewer than one "
                                            r"batch \(32 per rank x 1 rank\(s\) = 32\); lower train\.global_batch_size"):
        check_one_batch(cfg, 16, 32, 1)
    with pytest.raises(DataPrepError, match=r"= 64\)"):
        check_one_batch(cfg, 63, 32, 2)
    check_one_batch(cfg, 32, 32, 1)
    check_one_batch(cfg, 64, 32, 2)
