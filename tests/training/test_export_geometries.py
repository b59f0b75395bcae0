"""The training export (``export_hf`` -> ``final/``) for checkpoint geometries and variants the
other tests do not build: what ``transformers`` reads from the input checkpoint (config fields,
generation config, tokenizer / processor files) must reach ``final/``, and ``final/`` must load
in ``transformers`` and in the engine with the same logits.

The fast tests export a loaded model directly (one process, no DeepSpeed: ``export_hf`` on rank 0
of a world of one); the ``slow`` one runs ``train.py`` SFT for a few steps on a few variants.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pgen_engine.config import ConfigError, ModelInitConfig
from pgen_engine.models import load_model
from pgen_engine.models.checkpoint import stored_dtypes
from pgen_engine.models.patch_kmeans import PatchKMeansTokenizer
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.training.checkpoints import export_hf
from pgen_engine.training.distributed import DistInfo
from pgen_engine.training.engine import set_trainable
from pgen_engine.training.init import init_model_for_tokenizer

REPO = Path(__file__).resolve().parents[2]
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def _edit_weights(path: Path, fn) -> None:
    f = path / "model.safetensors"
    save_file(fn(load_file(f)), str(f), metadata={"format": "pt"})


def _tie(path: Path) -> None:
    _edit_config(path, lambda c: c.update(tie_word_embeddings=True))
    _edit_weights(path, lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"})


def _bf16(path: Path) -> None:
    _edit_weights(path, lambda sd: {k: v.bfloat16() for k, v in sd.items()})
    _edit_config(path, lambda c: c.update(dtype="bfloat16"))


def _bf16_legacy(path: Path) -> None:
    """bf16 weights and the dtype under the key transformers 4.x wrote (``torch_dtype``), also
    in the text section."""
    _edit_weights(path, lambda sd: {k: v.bfloat16() for k, v in sd.items()})

    def legacy(c: dict) -> None:
        c.pop("dtype", None)
        c["torch_dtype"] = "bfloat16"
        c["text_config"]["torch_dtype"] = "bfloat16"
    _edit_config(path, legacy)


def _linear_rope(path: Path) -> None:
    _edit_config(path, lambda c: c["text_config"].update(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}, rms_norm_eps=1e-5))


VARIANTS = {
    "tied": ({}, _tie),
    "head_dim24_mqa": ({"head_dim": 24, "num_kv_heads": 1}, None),
    "kv_eq_heads_1layer_odd_vocab": ({"num_kv_heads": 4, "num_layers": 1, "vocab_size": 301}, None),
    "k37_vq_dim12": ({"codebook_size": 37, "vq_embed_dim": 12}, None),
    "img16_patch8": ({"image_size": 16, "patch_size": 8}, None),
    "img64_patch16": ({"image_size": 64, "patch_size": 16}, None),
    "linear_rope": ({}, _linear_rope),
    "bf16": ({}, _bf16),
    "bf16_legacy_key": ({}, _bf16_legacy),
}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _exported(tmp_path: Path, name: str) -> tuple[Path, Path]:
    kw, post = VARIANTS[name]
    src = make_tiny_checkpoint(tmp_path / "in", seed=1, **kw)
    if post:
        post(src)
    final = export_hf(load_model(src), tmp_path / "final", ONE)
    return src, final


def _hf_vs_engine(final: Path) -> None:
    """transformers' and the engine's load of ``final`` give the same text and image logits."""
    # late import: transformers takes seconds to import; only these tests need the model class
    from transformers import JanusForConditionalGeneration

    hf = JanusForConditionalGeneration.from_pretrained(final).eval()
    pg = load_model(final)
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h_hf = hf.model.language_model(input_ids=ids).last_hidden_state
        h_pg = pg.forward_train(pg.language_model.embed_tokens(ids), torch.ones_like(ids, dtype=torch.bool),
                                torch.arange(ids.shape[1]).expand(2, -1))
        torch.testing.assert_close(pg.lm_head(h_pg), hf.lm_head(h_hf), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pg.image_head_logits(h_pg), hf.model.generation_head(h_hf), rtol=1e-5, atol=1e-5)
    assert hf.config.tie_word_embeddings == pg.config.tie_word_embeddings


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_keeps_config_and_matches_transformers(tmp_path, name):
    src, final = _exported(tmp_path, name)
    before = _flat(json.loads((src / "config.json").read_text()))
    after = _flat(json.loads((final / "config.json").read_text()))
    written = {k: v for k, v in after.items() if k.rsplit(".", 1)[-1] in ("dtype", "torch_dtype")}
    # every field transformers reads is kept; only the dtype says what the export holds
    assert {k: v for k, v in before.items() if k not in written} == \
        {k: v for k, v in after.items() if k not in written}
    assert set(written.values()) == {"float32"}, written  # no stale "bfloat16" next to float32 tensors
    assert stored_dtypes(final) == {"F32": sum(stored_dtypes(src).values())}
    _hf_vs_engine(final)


def _sidecars(src: Path) -> dict[str, str]:
    files = {n: json.dumps({"file": n}) for n in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
        "preprocessor_config.json", "processor_config.json", "chat_template.jinja")}
    files["merges.txt"] = "#version: 0.2\na b\n"
    for n, text in files.items():
        (src / n).write_text(text)
    return files


def test_export_carries_tokenizer_and_processor_files(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "in", seed=1)
    files = _sidecars(src)
    final = export_hf(load_model(src), tmp_path / "final", ONE)
    assert {n: (final / n).read_text() if (final / n).is_file() else None for n in files} == files


def test_export_keeps_the_generation_config_transformers_generates_with(tmp_path):
    # guidance_scale / sampling settings of the input's generation_config.json are what
    # transformers' Janus generate uses; the export rewrote the file with the token ids only
    src = make_tiny_checkpoint(tmp_path / "in", seed=1)
    gen = json.loads((src / "generation_config.json").read_text())
    gen.update(guidance_scale=3.0, temperature=0.7, do_sample=True, eos_token_id=[2, 7])
    gen["generation_kwargs"]["num_image_tokens"] = 16
    (src / "generation_config.json").write_text(json.dumps(gen))
    final = export_hf(load_model(src), tmp_path / "final", ONE)
    out = json.loads((final / "generation_config.json").read_text())
    assert {k: out.get(k) for k in gen} == gen
    from transformers import GenerationConfig  # late import: transformers takes seconds to import

    g = GenerationConfig.from_pretrained(final)
    assert (g.guidance_scale, g.temperature, g.do_sample, g.eos_token_id) == (3.0, 0.7, True, [2, 7])


@pytest.mark.parametrize("groups", [["generation_head", "lm_head"], ["generation_head", "language_model"]])
def test_tied_head_trains_when_either_of_its_groups_is_listed(tmp_path, groups):
    # lm_head.weight is language_model.embed_tokens.weight: ["lm_head"] left it frozen
    src = make_tiny_checkpoint(tmp_path / "in", seed=1)
    _tie(src)
    model = load_model(src)
    n = set_trainable(model, groups)
    assert model.lm_head.weight.requires_grad
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.vision_model.parameters())


@pytest.mark.parametrize("geometry, says", [({"hidden_size": 36, "num_heads": 4}, "head_dim`=9"),
                                            ({"vision_hidden_size": 30, "vision_heads": 4}, "divisible by num_heads")])
def test_init_geometry_transformers_refuses_is_one_config_error(tmp_path, geometry, says):
    # was transformers' traceback out of train.py (after data preparation), and no model folder
    images = torch.randint(0, 256, (4, 16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    tok = PatchKMeansTokenizer.fit(images, patch_size=8, codebook_size=4, iters=1, seed=0)
    with pytest.raises(ConfigError, match=f"^model.init: .*{re.escape(says)}") as e:
        init_model_for_tokenizer(tmp_path / "init", tok, ModelInitConfig(**geometry))
    assert "\n" not in str(e.value) and not (tmp_path / "init").exists()


# ----------------------------------------------------------------------------- train.py SFT
def _env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("name", ["tied", "head_dim24_mqa", "bf16"])
def test_sft_final_of_variant_loads_in_transformers_and_keeps_frozen_parts(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "export_geometries_data"  # dataset + tokenizer, shared
    tmp = tmp_path_factory.mktemp(name)
    kw, post = VARIANTS[name]
    src = make_tiny_checkpoint(tmp / "in", seed=1, codebook_size=64, **kw)
    if post:
        post(src)
    for n in ("preprocessor_config.json", "vocab.json", "merges.txt", "added_tokens.json"):
        # (no tokenizer.json: train.py would tokenize its prompts with it)
        (src / n).write_text("{}")
    args = [f"model.checkpoint={src}", f"output_dir={tmp / 'run'}", f"data.dataset_dir={root / 'synth'}",
            f"data.work_dir={root / 'work'}", "data.synth.users=60", "data.patch_size=8", "data.codebook_size=64",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=2", "train.warmup_steps=1",
            "logging.progress=false"]
    p = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "demo_sft.yaml"),
                        *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    final = tmp / "run" / "final"
    before, after = load_model(src), load_model(final)
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {n.split(".")[0] for n in old if not torch.equal(old[n], new[n])}
    assert "generation_head" in changed and not changed & {"vision_model", "vqmodel"}, changed
    assert stored_dtypes(final) == {"F32": sum(stored_dtypes(src).values())}  # CPU trains in float32
    assert all((final / n).is_file() for n in ("preprocessor_config.json", "merges.txt", "added_tokens.json"))
    _hf_vs_engine(final)
