"""train_vq: learns, keeps the codebook in use, respects its limits."""
import dataclasses

import pytest
import torch

from pgen_engine.models.image_quality import evaluate_tokenizer
from pgen_engine.models.vq_train import VQTrainConfig, train_vq


@pytest.fixture(autouse=True)
def one_thread():
    # OpenMP threads spin-wait; on a shared 2-core box one thread is many times faster
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 2, 2, 3), generator=g, dtype=torch.uint8)
    return base.repeat_interleave(size // 2, 1).repeat_interleave(size // 2, 2).contiguous()


def test_training_improves_reconstruction_and_revives_codes():
    imgs = _images(24)
    cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16, batch_size=4, lr=3e-3,
                        max_steps=1, revive_every=1, revive_after=3, ae_warmup_steps=0)  # random init: dead codes
    tok0, _ = train_vq(imgs, cfg, progress=False)
    cfg.max_steps = 40
    tok, rep = train_vq(imgs, cfg, progress=False)
    q0, q = evaluate_tokenizer(tok0, imgs), evaluate_tokenizer(tok, imgs)
    assert rep.steps == 40 and rep.revived > 0
    assert q["psnr"] > q0["psnr"] + 0.5
    assert q["used"] >= 2


def test_time_budget_stops_training():
    cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16, batch_size=2, max_steps=10_000,
                        time_budget_s=0.5)
    _, rep = train_vq(_images(4), cfg, progress=False)
    assert rep.steps < 10_000 and rep.seconds < 60


def test_bad_inputs():
    cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16)
    with pytest.raises(ValueError, match="uint8"):
        train_vq(torch.zeros(4, 32, 32, 3, dtype=torch.uint8), cfg, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        train_vq(_images(1), cfg, progress=False)
    with pytest.raises(ValueError, match="ema_decay"):
        train_vq(_images(4), VQTrainConfig(image_size=16, codes_per_side=4, ema_decay=1.0), progress=False)


def test_spherical_kmeans_finds_unit_centroids_of_clusters():
    from pgen_engine.models.vq_train import spherical_kmeans

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    x = torch.nn.functional.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 8, generator=g), dim=1)
    g1 = torch.Generator().manual_seed(1)
    c = spherical_kmeans(x, 12, 10, g1)
    assert c.shape == (12, 8) and torch.allclose(c.norm(dim=1), torch.ones(12), atol=1e-5)
    # every true centre has a centroid within a small angle, and Lloyd steps beat the seeding
    assert float((centres @ c.T).max(1).values.min()) > 0.98
    seeded = spherical_kmeans(x, 12, 0, torch.Generator().manual_seed(1))
    assert float((x @ c.T).max(1).values.mean()) > float((x @ seeded.T).max(1).values.mean())


@pytest.mark.parametrize("warmup, steps", [(3, 8), (1000, 4)])
def test_autoencoder_warmup_then_kmeans_codebook(warmup, steps):
    # (1000, 4): the run ends inside the warm-up; the codebook is still fit to the encoder
    imgs = _images(24)
    cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16, batch_size=4, max_steps=steps,
                        ae_warmup_steps=warmup)
    tok, rep = train_vq(imgs, cfg, progress=False)
    emb = tok.vqvae.quantize.embedding.weight
    assert rep.steps == steps
    assert torch.allclose(emb.norm(dim=1), torch.ones(16), atol=1e-5)
    assert evaluate_tokenizer(tok, imgs)["used"] >= 4  # k-means centroids of real encoder outputs are used


def test_bf16_and_fp32_steps_both_learn():
    imgs = _images(24)
    for bf16 in (True, False):
        cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16, batch_size=4, max_steps=30,
                            bf16=bf16, ae_warmup_steps=5)
        tok, rep = train_vq(imgs, cfg, progress=False)
        assert rep.rec_mse < 0.5 and torch.isfinite(torch.tensor(rep.rec_mse))


def test_torch_init_scales_convs_by_fan_in():
    from pgen_engine.models.vq_train import fresh_vqvae

    base = dict(image_size=16, codes_per_side=4, codebook_size=16)
    hf = fresh_vqvae(VQTrainConfig(**base, torch_init=False))
    pt = fresh_vqvae(VQTrainConfig(**base, torch_init=True))
    w_hf, w_pt = hf.encoder.conv_in.weight, pt.encoder.conv_in.weight  # fan-in 3*3*3 = 27
    assert abs(float(w_hf.std()) - 0.02) < 0.005  # transformers' N(0, 0.02)
    bound = 1 / 27 ** 0.5  # kaiming-uniform(a=sqrt(5)) bound
    assert float(w_pt.abs().max()) <= bound + 1e-6 and float(w_pt.std()) > 0.5 * bound / 3 ** 0.5
    # same module tree: the checkpoint still loads in transformers' JanusVQVAE
    assert hf.state_dict().keys() == pt.state_dict().keys()


def test_ema_step_moves_used_codes_toward_their_outputs():
    from pgen_engine.models.vq_train import ema_codebook_step

    g = torch.Generator().manual_seed(0)
    code = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    count, total = torch.ones(4), code.clone()
    target = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    z = torch.nn.functional.normalize(target + 0.05 * torch.randn(6, 8, generator=g), dim=1)
    idx = torch.tensor([0, 0, 0, 2, 2, 2])
    cnt = ema_codebook_step(count, total, idx, z, decay=0.9)
    new = torch.nn.functional.normalize(total, dim=1)
    assert cnt.tolist() == [3, 0, 3, 0]
    assert torch.allclose(count, torch.tensor([0.9 + 0.3, 0.9, 0.9 + 0.3, 0.9]))
    for c in (0, 2):  # used: closer to the outputs assigned to them
        assert float(new[c] @ target) > float(code[c] @ target)
    for c in (1, 3):  # unused: same direction
        assert torch.allclose(new[c], code[c], atol=1e-6)


def test_init_continues_a_trained_tokenizer_without_touching_it():
    imgs = _images(24)
    cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16, batch_size=4, max_steps=30,
                        time_budget_s=1e6, ae_warmup_steps=5)
    tok, _ = train_vq(imgs, cfg, progress=False)
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    # a near-zero step continues from exactly the init's encoder, codebook and decoder
    tiny = dataclasses.replace(cfg, max_steps=1, lr=1e-12, ema_decay=1 - 1e-9, ae_warmup_steps=50)
    same, rep = train_vq(imgs, tiny, progress=False, init=tok)
    assert rep.steps == 1
    assert torch.equal(same.encode(imgs), tok.encode(imgs))
    assert torch.allclose(same.decode(tok.encode(imgs)).float(), tok.decode(tok.encode(imgs)).float(), atol=1)
    # more steps keep learning from there; the init tokenizer itself is untouched
    more, _ = train_vq(imgs, dataclasses.replace(cfg, max_steps=30, lr=1e-3), progress=False, init=tok)
    assert evaluate_tokenizer(more, imgs)["psnr"] > evaluate_tokenizer(tok, imgs)["psnr"] - 0.5
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())
    with pytest.raises(ValueError, match="geometry"):
        train_vq(imgs, dataclasses.replace(cfg, codebook_size=32), progress=False, init=tok)


def test_crop_training_learns_and_tokenizes_whole_images():
    imgs = _images(24)
    cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16, batch_size=4, lr=3e-3, max_steps=1,
                        ae_warmup_steps=0, crop_size=8, crop_frac=0.75)
    tok0, _ = train_vq(imgs, cfg, progress=False)
    cfg.max_steps = 60
    tok, rep = train_vq(imgs, cfg, progress=False)
    assert rep.steps == 60
    assert evaluate_tokenizer(tok, imgs)["psnr"] > evaluate_tokenizer(tok0, imgs)["psnr"] + 0.5
    assert tuple(tok.encode(imgs[:3]).shape) == (3, 16)  # whole images, 4 x 4 codes each


@pytest.mark.parametrize("bad, match", [(dict(crop_size=6), "multiple of 4"), (dict(crop_size=32), "multiple of 4"),
                                        (dict(crop_size=8, crop_frac=1.5), "crop_frac")])
def test_bad_crop_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        train_vq(_images(4), VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=16, **bad), progress=False)


@pytest.mark.parametrize("size, side, want", [(64, 8, 40), (16, 4, 16), (384, 24, 240), (32, 2, 32), (128, 16, 80)])
def test_auto_crop_is_five_eighths_of_the_grid_with_at_least_four_codes(size, side, want):
    cfg = VQTrainConfig(image_size=size, codes_per_side=side)
    cfg.validate()
    assert cfg.crop_px() == want
    assert VQTrainConfig(image_size=size, codes_per_side=side, crop_size=0).crop_px() == size
