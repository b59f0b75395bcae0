"""JanusVQTokenizer: save/load, checkpoint install, decode parity with transformers."""
import json

import pytest
import torch

from pgen_engine.models.vq_train import VQTrainConfig, train_vq
from pgen_engine.models.vq_tokenizer import JanusVQTokenizer, install_into_checkpoint, vq_config


def _images(n=12, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish blocks so a few steps make progress
    base = torch.randint(0, 256, (n, 4, 4, 3), generator=g, dtype=torch.uint8)
    return base.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2).contiguous()


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)  # OpenMP spin-waits make 2 threads far slower on a shared 2-core box
    cfg = VQTrainConfig(image_size=16, codes_per_side=4, codebook_size=32, batch_size=4, max_steps=6,
                        time_budget_s=300, revive_every=2, revive_after=2)
    tok, rep = train_vq(_images(), cfg, progress=False)
    return tok, rep


def test_vq_config_checks():
    c = vq_config(image_size=64, codes_per_side=8, codebook_size=1024)
    assert c["num_patches"] == 8 and len(c["channel_multiplier"]) == 4
    with pytest.raises(ValueError, match="power of two"):
        vq_config(image_size=48, codes_per_side=8)
    with pytest.raises(ValueError, match="multiple of 32"):
        vq_config(base_channels=16)


def test_codebook_unit_norm_and_encode_decode_shapes(trained):
    tok, rep = trained
    assert rep.steps == 6
    w = tok.vqvae.quantize.embedding.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(w.shape[0]), atol=1e-5)
    x = _images(3, seed=1)
    codes = tok.encode(x)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64
    assert int(codes.max()) < 32
    y = tok.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_save_load_roundtrip(trained, tmp_path):
    tok, _ = trained
    tok.meta = {"note": "x"}
    p = tmp_path / "vq.safetensors"
    tok.save(p)
    back = JanusVQTokenizer.load(p)
    assert back.fingerprint() == tok.fingerprint() and back.meta == {"note": "x"}
    x = _images(2, seed=2)
    assert torch.equal(back.encode(x), tok.encode(x))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.safetensors"):
        JanusVQTokenizer.load(bad)
    with pytest.raises(FileNotFoundError):
        JanusVQTokenizer.load(tmp_path / "missing.safetensors")


def test_install_into_checkpoint_decodes_identically(trained, tmp_path):
    from transformers import JanusForConditionalGeneration

    from pgen_engine.models import load_model
    from pgen_engine.models.image_tokenizer import VQImageTokenizer
    from pgen_engine.models.tiny import make_tiny_checkpoint

    tok, _ = trained
    ck = make_tiny_checkpoint(tmp_path / "ck", image_size=16, patch_size=4, codebook_size=32)
    install_into_checkpoint(tok, ck)
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["vq_config"]["base_channels"] == tok.config["base_channels"]
    assert cfg["vq_config"]["num_patches"] == 4

    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(3))
    want = tok.decode(codes)
    engine = load_model(ck)
    assert torch.equal(engine.decode_images(codes), want)
    hf = JanusForConditionalGeneration.from_pretrained(ck).eval()
    with torch.no_grad():
        pix = hf.decode_image_tokens(codes)
    from pgen_engine.models.janus import pixels_to_uint8

    assert torch.equal(pixels_to_uint8(pix), want)
    # the checkpoint's own tokenizer, loaded without the LM, is the same tokenizer
    own = JanusVQTokenizer.from_checkpoint(ck)
    assert own.fingerprint() == tok.fingerprint() == VQImageTokenizer(engine).fingerprint()
    x = _images(2, seed=4)
    assert torch.equal(own.encode(x), VQImageTokenizer(engine).encode(x))


def test_install_refuses_other_geometry(trained, tmp_path):
    from pgen_engine.models.tiny import make_tiny_checkpoint

    tok, _ = trained
    ck = make_tiny_checkpoint(tmp_path / "ck", image_size=16, patch_size=4, codebook_size=64)
    with pytest.raises(ValueError, match="geometry"):
        install_into_checkpoint(tok, ck)


def test_init_model_for_vq_tokenizer_carries_the_trained_vq(trained, tmp_path):
    from pgen_engine.config import ModelInitConfig
    from pgen_engine.models import load_model
    from pgen_engine.training.init import init_model_for_tokenizer

    tok, _ = trained
    ck = init_model_for_tokenizer(tmp_path / "init", tok, ModelInitConfig(vq_embed_dim=64))
    m = load_model(ck)
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(m.decode_images(codes), tok.decode(codes))
    assert m.generation_embeddings.weight.shape == (32, tok.config["embed_dim"])


def test_one_code_per_image_handles_a_lone_image_in_the_last_chunk():
    """codes_per_side 1, a lone image in the last chunk: the same codes and pixels as in one batch."""
    torch.set_num_threads(1)
    cfg = VQTrainConfig(image_size=8, codes_per_side=1, codebook_size=8, batch_size=4, max_steps=2,
                        time_budget_s=300)
    tok, _ = train_vq(_images(8, size=8), cfg, progress=False)
    tok.batch_size = 2
    x = _images(3, size=8, seed=2)
    codes = tok.encode(x)
    assert codes.shape == (3, 1)
    tok.batch_size = 3
    assert torch.equal(codes, tok.encode(x))
    whole = tok.decode(codes)
    tok.batch_size = 2
    assert torch.equal(tok.decode(codes), whole)
