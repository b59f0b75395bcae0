"""Strict checkpoint loading and atomic HF-format saving."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import JanusForConditionalGeneration

import pgen_engine as pg
from pgen_engine.models.checkpoint import INDEX_NAME


@pytest.fixture()
def ckpt(tmp_path, tiny_ckpt):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, d)
    return d


def _edit_weights(d, fn):
    f = d / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_loads_and_counts_parameters(tiny_ckpt, tiny_hf):
    m = pg.load_model(tiny_ckpt)
    assert m.num_parameters() == tiny_hf.num_parameters()
    assert not m.training
    assert all(not p.is_meta for p in m.parameters())


def test_missing_key_is_named(ckpt):
    _edit_weights(ckpt, lambda sd: sd.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(pg.CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight"):
        pg.load_model(ckpt)


def test_unexpected_key_is_named(ckpt):
    _edit_weights(ckpt, lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(pg.CheckpointError, match=r"unexpected.*model\.extra\.weight"):
        pg.load_model(ckpt)


def test_shape_mismatch_is_named(ckpt):
    def f(sd):
        sd["model.generation_head.vision_head.bias"] = torch.zeros(3)
    _edit_weights(ckpt, f)
    with pytest.raises(pg.CheckpointError, match=r"vision_head\.bias.*shape"):
        pg.load_model(ckpt)


def test_unsupported_dtype_is_named(ckpt):
    def f(sd):
        sd["model.language_model.norm.weight"] = sd["model.language_model.norm.weight"].to(torch.int32)
    _edit_weights(ckpt, f)
    with pytest.raises(pg.CheckpointError, match=r"norm\.weight.*dtype"):
        pg.load_model(ckpt)


def test_nan_weights_are_refused(ckpt):
    def f(sd):
        sd["model.language_model.norm.weight"][0] = float("nan")
    _edit_weights(ckpt, f)
    with pytest.raises(pg.CheckpointError, match="NaN"):
        pg.load_model(ckpt)


def test_wrong_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llava"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pg.CheckpointError, match="model_type"):
        pg.load_model(ckpt)


def test_deepseek_original_format_says_how_to_convert(ckpt):
    (ckpt / "config.json").write_text(json.dumps({"model_type": "multi_modality", "language_config": {}}))
    with pytest.raises(pg.CheckpointError, match="DeepSeek's original Janus format.*convert_janus_weights_to_hf"):
        pg.load_model(ckpt)


def test_pickled_weights_are_named_and_never_unpickled(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({"not": "read"}, ckpt / "pytorch_model.bin")
    with pytest.raises(pg.CheckpointError, match=r"found pytorch_model\.bin: pgen reads safetensors only, re-save"):
        pg.load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(pg.CheckpointError, match="model.safetensors"):
        pg.load_model(ckpt)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(pg.CheckpointError, match="not a directory"):
        pg.load_model(tmp_path / "nope")
    with pytest.raises(pg.CheckpointError, match="config.json"):
        pg.load_model(tmp_path)


def test_sharded_checkpoint_loads(tmp_path, tiny_model):
    out = tmp_path / "sharded"
    tiny_model.save_pretrained(out, max_shard_bytes=200_000)
    assert (out / INDEX_NAME).is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    m = pg.load_model(out)
    for (n1, p1), (n2, p2) in zip(tiny_model.state_dict().items(), m.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    hf = JanusForConditionalGeneration.from_pretrained(out)
    assert hf.num_parameters() == m.num_parameters()


def test_sharded_index_with_missing_shard(tmp_path, tiny_model):
    out = tmp_path / "sharded"
    tiny_model.save_pretrained(out, max_shard_bytes=200_000)
    next(iter(sorted(out.glob("model-*.safetensors")))).unlink()
    with pytest.raises(pg.CheckpointError, match="missing shard"):
        pg.load_model(out)


def test_round_trip_through_transformers(tmp_path, tiny_model, tiny_hf):
    out = tmp_path / "rt"
    tiny_model.save_pretrained(out)
    hf = JanusForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.randint(6, 200, (2, 8))
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, tiny_hf(input_ids=ids).logits)
    again = pg.load_model(out)
    assert torch.equal(again.text_logits(ids), tiny_model.text_logits(ids))
    assert again.special_tokens == tiny_model.special_tokens


def test_save_is_atomic_on_failure(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "good"
    tiny_model.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from pgen_engine.models import checkpoint_writer

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint_writer, "save_file", boom)
    with pytest.raises(OSError):
        tiny_model.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".good")]


def test_saved_files_get_normal_permissions(tmp_path, tiny_model):
    # safetensors creates its file 0600: model.safetensors was unreadable to other users, next to a 0644 config.json
    import os
    import stat

    mask = os.umask(0o022)
    try:
        tiny_model.save_pretrained(tmp_path / "out")
        tiny_model.save_pretrained(tmp_path / "out", max_shard_bytes=1 << 14)
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert len(modes) > 4 and set(modes.values()) == {0o644}, modes



def test_save_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path, tiny_model):
    # save_pretrained("some/folder") used to replace any existing folder with the checkpoint
    keep = tmp_path / "docs"
    keep.mkdir()
    (keep / "notes.txt").write_text("keep me")
    with pytest.raises(pg.CheckpointError, match=r"docs: exists and is not a checkpoint \(no config.json\)"):
        tiny_model.save_pretrained(keep)
    assert sorted(x.name for x in keep.iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    tiny_model.save_pretrained(tmp_path / "empty")
    tiny_model.save_pretrained(tmp_path / "empty")  # a checkpoint now: replaced
    assert (tmp_path / "empty" / "config.json").is_file()

def test_tied_embeddings_checkpoint(tmp_path):
    from transformers import JanusForConditionalGeneration
    from pgen_engine.models.tiny import tiny_janus_config

    cfg = tiny_janus_config()
    cfg.tie_word_embeddings = True
    hf = JanusForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path / "tied")
    m = pg.load_model(tmp_path / "tied")
    assert m.lm_head.weight is m.language_model.embed_tokens.weight
    ids = torch.randint(6, 200, (1, 6))
    with torch.no_grad():
        assert (m.text_logits(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-4
    m.save_pretrained(tmp_path / "tied2")
    assert (JanusForConditionalGeneration.from_pretrained(tmp_path / "tied2").num_parameters()
            == hf.num_parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load(tiny_ckpt, dtype):
    m = pg.load_model(tiny_ckpt, dtype=dtype)
    assert all(p.dtype == dtype for p in m.parameters())
    logits = m.text_logits(torch.randint(6, 200, (1, 5)))
    assert torch.isfinite(logits).all()


def test_rejects_int_dtype(tiny_ckpt):
    with pytest.raises(pg.CheckpointError, match="dtype"):
        pg.load_model(tiny_ckpt, dtype=torch.int8)


def test_dtype_by_name(tiny_ckpt):
    # dtype="bfloat16" used to be refused as "dtype bfloat16 is not supported; use one of (..., torch.bfloat16)"
    for name in ("bfloat16", "torch.bfloat16"):
        assert pg.load_model(tiny_ckpt, dtype=name).dtype == torch.bfloat16
    with pytest.raises(pg.CheckpointError, match=r"dtype 'bf16' is not supported; use one of .* \(or its name\)"):
        pg.load_model(tiny_ckpt, dtype="bf16")


@pytest.mark.slow
def test_janus_pro_1b_geometry_parameter_count(tmp_path):
    """Real-size Janus-Pro-1B config with random weights: saved by transformers, loaded by the engine."""
    from transformers import JanusConfig

    cfg = JanusConfig(
        text_config=dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=102400,
                         max_position_embeddings=16384),
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                           patch_size=16, projection_dim=2048, intermediate_size=4096, num_image_tokens=576),
        vq_config=dict(projection_dim=2048, image_token_embed_dim=2048),
        image_token_id=100581, tie_word_embeddings=False,
    )
    hf = JanusForConditionalGeneration(cfg).to(torch.bfloat16)
    expected = hf.num_parameters()
    hf.save_pretrained(tmp_path / "1b")
    del hf
    m = pg.load_model(tmp_path / "1b", dtype=torch.bfloat16)
    assert m.num_parameters() == expected
    assert 1.9e9 < expected < 2.2e9
    assert m.num_image_tokens == 576 and m.codebook_size == 16384 and m.image_size == 384


def _edit_json(d, name, fn):
    f = d / name
    obj = json.loads(f.read_text())
    obj = fn(obj) or obj
    f.write_text(json.dumps(obj))


@pytest.mark.parametrize("text,expect", [
    ("{oops", "invalid JSON"),
    ("[]", "expected a JSON object"),
    ('{"generation_kwargs": [1]}', "generation_kwargs"),
])
def test_bad_generation_config_names_the_file(ckpt, text, expect):
    (ckpt / "generation_config.json").write_text(text)
    with pytest.raises(pg.CheckpointError, match="generation_config.json") as e:
        pg.load_model(ckpt)
    assert expect in str(e.value)


def test_special_token_outside_vocab_or_not_an_int(ckpt):
    _edit_json(ckpt, "generation_config.json", lambda g: g["generation_kwargs"].__setitem__("boi_token_id", 10 ** 6))
    with pytest.raises(pg.CheckpointError, match=r"boi=1000000 .*outside the text vocabulary \[0, 300\)"):
        pg.load_model(ckpt)
    _edit_json(ckpt, "generation_config.json", lambda g: g["generation_kwargs"].__setitem__("boi_token_id", "x"))
    with pytest.raises(pg.CheckpointError, match="generation_config.json"):
        pg.load_model(ckpt)


@pytest.mark.parametrize("field,value", [
    ("vocab_size", -3), ("hidden_size", 0), ("num_key_value_heads", "x"), ("rope_parameters", [1]),
])
def test_invalid_text_config_values_name_config_json(ckpt, field, value):
    _edit_json(ckpt, "config.json", lambda c: c["text_config"].__setitem__(field, value))
    with pytest.raises(pg.CheckpointError, match="config.json"):
        pg.load_model(ckpt)


@pytest.mark.parametrize("weight_map,expect", [
    ([1], "weight_map"),
    ({"model.x": "../../elsewhere.safetensors"}, "plain file"),
])
def test_bad_index_file(ckpt, weight_map, expect):
    (ckpt / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(pg.CheckpointError, match=INDEX_NAME) as e:
        pg.load_model(ckpt)
    assert expect in str(e.value)


def test_training_run_layouts_point_at_final(tmp_path, tiny_ckpt):
    run = tmp_path / "run"
    shutil.copytree(tiny_ckpt, run / "final")
    step = run / "checkpoints" / "step00000010"
    step.mkdir(parents=True)
    (step / "pgen_checkpoint.json").write_text('{"step": 10}')
    (run / "checkpoints" / "latest").write_text("step00000010")
    for d in (run, step, run / "checkpoints"):
        with pytest.raises(pg.CheckpointError) as e:
            pg.load_model(d)
        assert "config.json" in str(e.value) and str(run / "final") in str(e.value), str(e.value)
    assert pg.load_model(run / "final").num_parameters() > 0


def test_config_and_special_token_checks_live_in_their_readers(ckpt):
    """The checks load_model relies on hold for every reader (e.g. the SFT data prep calls
    JanusModelConfig.from_dir and SpecialTokens.from_checkpoint directly)."""
    from pgen_engine.models.janus_config import JanusModelConfig

    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["num_hidden_layers"] = 0
    with pytest.raises(pg.CheckpointError, match=r"my.json: text_config.num_layers=0 must be a positive integer"):
        JanusModelConfig.from_dict(raw, source="my.json")
    raw["text_config"]["num_hidden_layers"] = 2
    raw["text_config"]["rope_parameters"] = [1]
    with pytest.raises(pg.CheckpointError, match=r"my.json: text_config.rope_parameters=\[1\] must be an object"):
        JanusModelConfig.from_dict(raw, source="my.json")
    _edit_json(ckpt, "generation_config.json", lambda g: g.__setitem__("pad_token_id", 300))
    with pytest.raises(pg.CheckpointError, match=r"pad=300 .*outside the text vocabulary \[0, 300\)"):
        pg.SpecialTokens.from_checkpoint(ckpt)
    _edit_json(ckpt, "generation_config.json", lambda g: g.__setitem__("pad_token_id", True))
    with pytest.raises(pg.CheckpointError, match="pad=True .* not an integer"):
        pg.SpecialTokens.from_checkpoint(ckpt)


def test_unusable_device_is_named_before_loading(tiny_ckpt, monkeypatch):
    # a CUDA device on a machine without one used to surface as torch's bare AssertionError
    # ("Torch not compiled with CUDA enabled"), a traceback under pgen eval
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pg.CheckpointError, match=r"device 'cuda:0': CUDA is not available"):
        pg.load_model(tiny_ckpt, device="cuda:0")
    with pytest.raises(pg.CheckpointError, match=r"device 'banana' is not a torch device"):
        pg.load_model(tiny_ckpt, device="banana")


def test_load_model_path_of_the_wrong_type_is_named(tiny_ckpt):
    # Path(None) used to say only "expected str, bytes or os.PathLike object, not NoneType"
    for bad in (None, 5):
        with pytest.raises(TypeError, match=rf"path must be a checkpoint folder .*got {type(bad).__name__} {bad}"):
            pg.load_model(bad)
    assert pg.load_model(str(tiny_ckpt)).num_image_tokens > 0


def test_weights_beyond_float16_range_are_refused_in_float16_only(ckpt):
    # used to load as Inf, and generation then reported an "activation overflow" of finite weights
    def f(sd):
        sd["model.language_model.norm.weight"][1] = 1e6
    _edit_weights(ckpt, f)
    with pytest.raises(pg.CheckpointError, match=r"'model\.language_model\.norm\.weight' holds values beyond "
                                                 r"float16's range \(largest \|value\| 1e\+06 > 65504\)"):
        pg.load_model(ckpt, dtype=torch.float16)
    for dtype in (torch.float32, torch.bfloat16):
        m = pg.load_model(ckpt, dtype=dtype)
        assert float(m.language_model.norm.weight[1].detach()) == pytest.approx(1e6, rel=1e-2)


def _text_logits_match(m, d):
    hf = JanusForConditionalGeneration.from_pretrained(d).eval()
    ids = torch.randint(6, 200, (1, 6))
    with torch.no_grad():
        assert (m.text_logits(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-4
    return hf


def test_tying_follows_transformers_when_config_and_weights_disagree(ckpt, tmp_path):
    """transformers' JanusConfig ties lm_head by default, and keeps both matrices when a tying
    config comes with a different stored lm_head. The engine used to default to untied (a
    config.json without the field and without lm_head.weight was refused as 'missing
    lm_head.weight') and, for a tying config, to drop the checkpoint's own lm_head silently."""
    # 1. tie_word_embeddings absent, no lm_head.weight stored: tied
    _edit_json(ckpt, "config.json", lambda c: c.pop("tie_word_embeddings"))
    _edit_weights(ckpt, lambda sd: sd.pop("lm_head.weight"))
    m = pg.load_model(ckpt)
    assert m.lm_head.weight is m.language_model.embed_tokens.weight
    _text_logits_match(m, ckpt)
    # 2. a tying config, but the checkpoint stores its own (different) lm_head: both kept, and saved
    _edit_weights(ckpt, lambda sd: sd.__setitem__("lm_head.weight", torch.randn_like(
        sd["model.language_model.embed_tokens.weight"])))
    m = pg.load_model(ckpt)
    assert m.lm_head.weight is not m.language_model.embed_tokens.weight and not m.config.tie_word_embeddings
    hf = _text_logits_match(m, ckpt)
    assert hf.lm_head.weight is not hf.model.language_model.embed_tokens.weight
    m.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(pg.load_model(tmp_path / "resaved").lm_head.weight, m.lm_head.weight)
    # ... the same values stored twice: tied
    _edit_weights(ckpt, lambda sd: sd.__setitem__("lm_head.weight",
                                                 sd["model.language_model.embed_tokens.weight"].clone()))
    m = pg.load_model(ckpt)
    assert m.lm_head.weight is m.language_model.embed_tokens.weight
    # 3. a tying config with lm_head.weight stored instead of embed_tokens: tied to it
    _edit_weights(ckpt, lambda sd: sd.pop("model.language_model.embed_tokens.weight"))
    m = pg.load_model(ckpt)
    assert m.lm_head.weight is m.language_model.embed_tokens.weight
    _text_logits_match(m, ckpt)
    # 4. not a JSON boolean: bool("false") used to tie
    _edit_json(ckpt, "config.json", lambda c: c.__setitem__("tie_word_embeddings", "false"))
    with pytest.raises(pg.CheckpointError, match=r"config\.json: tie_word_embeddings='false' must be true or false"):
        pg.load_model(ckpt)


@pytest.mark.parametrize("section,key,value,match", [
    # each used to escape as a bare KeyError('bogus') or huggingface_hub's StrictDataclassFieldValidationError
    # (a traceback from `pgen generate`), naming neither config.json nor the section
    ("vq_config", "hidden_act", "bogus", r"vq_config\.hidden_act='bogus' is not an activation transformers knows"),
    ("vision_config", "hidden_act", "bogus", r"vision_config\.hidden_act='bogus' is not an activation"),
    ("vision_config", "mlp_ratio", "x", r"vision_config: Field 'mlp_ratio' .*got str"),
    ("vq_config", "base_channels", "x", r"vq_config: Field 'base_channels' expected int, got str"),
])
def test_bad_vision_or_vq_config_field_is_named(ckpt, section, key, value, match):
    _edit_json(ckpt, "config.json", lambda c: c[section].__setitem__(key, value))
    with pytest.raises(pg.CheckpointError, match=rf"config\.json: cannot build the model .*{match}"):
        pg.load_model(ckpt)


@pytest.mark.parametrize("num_patches", [None, 7])
def test_vq_code_grid_comes_from_the_vision_grid(ckpt, num_patches):
    """transformers' JanusConfig sets vq_config.num_patches from image_size / patch_size whatever
    config.json says. A config.json without it (or with another value) used to load, generate its
    16 codes, and only then fail in decode_images ('Expected image_tokens ... (batch_size, 1024)')."""
    from pgen_engine.models.vq_tokenizer import JanusVQTokenizer

    def edit(c):
        c["vq_config"].pop("num_patches")
        if num_patches is not None:
            c["vq_config"]["num_patches"] = num_patches
    _edit_json(ckpt, "config.json", edit)
    m = pg.load_model(ckpt)
    hf = JanusForConditionalGeneration.from_pretrained(ckpt).eval()
    codes = torch.randint(0, m.codebook_size, (2, m.num_image_tokens))
    with torch.no_grad():
        ref = ((hf.decode_image_tokens(codes).clamp(-1, 1) + 1) * 127.5).round()
    assert (m.decode_images(codes).float() - ref).abs().max() <= 1
    tok = JanusVQTokenizer.from_checkpoint(ckpt)
    assert tok.num_tokens == m.num_image_tokens and tok.image_size == m.image_size
