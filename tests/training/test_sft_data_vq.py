"""data.tokenizer=vq: a Janus VQ trained on the dataset's images is the run's tokenizer and
the init model's own vqmodel.*, and is reused on the next run."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.config import load_config
from pgen_engine.data.dataset import load_dataset, load_image
from pgen_engine.data.synth import SynthConfig, generate_synthetic
from pgen_engine.eval.demo import CONFIGS
from pgen_engine.models import load_model
from pgen_engine.models.vq_tokenizer import JanusVQTokenizer
from pgen_engine.training.distributed import DistInfo
from pgen_engine.training.sft_data import prepare_sft_data


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, data_dir):
    # the MovieLens config (what `pgen demo --data` runs) at a tiny geometry: 16 px, 4x4 codes
    return load_config(CONFIGS / "movielens_sft.yaml", [
        f"data.dataset_dir={data_dir}", f"data.work_dir={tmp_path / 'work'}", f"output_dir={tmp_path / 'run'}",
        "data.tokenizer_image_size=16", "data.patch_size=4", "data.codebook_size=32", "data.vq_max_steps=3",
        "data.with_titles=false", "logging.progress=false", "model.init.hidden_size=32", "model.init.num_heads=2",
        "model.init.num_kv_heads=1", "model.init.intermediate_size=64", "model.init.num_layers=1"])


@pytest.mark.e2e
def test_vq_tokenizer_is_fit_installed_and_reused(tmp_path, capsys):
    data_dir = tmp_path / "data"
    generate_synthetic(data_dir, SynthConfig(num_users=12, num_items=24, image_size=32, seed=0))
    cfg = _cfg(tmp_path, data_dir)
    assert cfg.data.tokenizer == "vq"
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    out = prepare_sft_data(cfg, info)
    tok = out.tokenizer
    assert isinstance(tok, JanusVQTokenizer)
    assert (tok.image_size, tok.num_tokens, tok.codebook_size) == (16, 16, 32)
    assert tok.meta["settings"]["max_steps"] == 3
    printed = capsys.readouterr().out
    assert "trained VQ tokenizer" in printed and "reconstruction PSNR:" in printed
    # the init model decodes codes with the trained VQ: same pixels as the tokenizer
    model = load_model(out.model_dir)
    codes = torch.randint(0, 32, (3, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.decode_images(codes), tok.decode(codes))
    # the token cache holds the trained VQ's codes of the item images
    ds = out.dataset
    assert ds.cache.fingerprint == tok.fingerprint()
    items = load_dataset(data_dir)
    iid = next(iter(items.items))
    img = torch.from_numpy(load_image(items.items[iid].image_path, 16))[None]
    assert torch.equal(ds.cache.codes([iid]).long(), tok.encode(img))
    # second run (e.g. the RL stage, another seed): nothing is retrained
    path = tmp_path / "work" / "vq_tokenizer.safetensors"
    before = path.stat().st_mtime_ns
    cfg2 = _cfg(tmp_path, data_dir)
    cfg2.seed = 7
    tok2 = prepare_sft_data(cfg2, info).tokenizer
    assert "reusing VQ tokenizer" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == before and tok2.fingerprint() == tok.fingerprint()
