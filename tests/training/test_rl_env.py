"""RLPromptSource: what the reward is given about each prompt's future."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from pgen_engine.config import RLConfig, RLConfigError
from pgen_engine.data.dataset import Dataset, Interaction, Item
from pgen_engine.data.splits import build_splits
from pgen_engine.training.rl_env import RLPromptSource, ensure_reward_embedder, rl_prompt_windows


class _Builder:
    """Codes-mode prompt builder stand-in: the prompt is the history codes."""

    mode, with_titles = "codes", False

    def build(self, codes, titles=None):
        ids = torch.cat([c for c in codes]) if codes else torch.zeros(0, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, gen_code_mask=torch.zeros_like(ids, dtype=torch.bool))


class _Cache:
    def codes(self, ids):
        return [torch.tensor([int(i[1:])]) for i in ids]


def _dataset():
    # every item is consumed once, so a history window names its example
    order = list(range(72))
    random.Random(0).shuffle(order)
    items = {f"i{j}": Item(f"i{j}", "", None) for j in range(72)}
    inter = {f"u{u}": [Interaction(f"i{order[12 * u + t]}", float(t), 2 + 12 * u + t) for t in range(12)]
             for u in range(6)}
    return Dataset(None, items, inter)


def _splits(max_windows=None):
    return build_splits(_dataset(), k=3, min_interactions=4, max_windows_per_user=max_windows)


def test_prompt_windows_unseen_are_the_older_train_windows_sft_skipped():
    data_cfg = SimpleNamespace(history_k=3, stride=1, min_interactions=4, max_windows_per_user=3)
    sft = _splits(3).train
    every = _splits().train
    assert rl_prompt_windows("sft", sft, _dataset(), data_cfg) == sft
    assert rl_prompt_windows("all", sft, _dataset(), data_cfg) == every
    unseen = rl_prompt_windows("unseen", sft, _dataset(), data_cfg)
    key = lambda e: (e.user_id, e.position)  # noqa: E731
    assert unseen and {key(e) for e in unseen} | {key(e) for e in sft} == {key(e) for e in every}
    assert not {key(e) for e in unseen} & {key(e) for e in sft}
    latest_sft = {}
    for e in sft:
        latest_sft[e.user_id] = min(latest_sft.get(e.user_id, e.position), e.position)
    # older than every window SFT kept for that user, and still train-split windows
    assert all(e.position < latest_sft[e.user_id] and e.split == "train" for e in unseen)
    with pytest.raises(RLConfigError, match="prompt_windows='unseen': no train window to draw from"):
        rl_prompt_windows("unseen", every, _dataset(), data_cfg)
    with pytest.raises(RLConfigError, match="prompt_windows"):
        RLConfig(prompt_windows="valid")
    # a prompt source over the unseen windows scores train-split future items only
    sp = _splits(3)
    src = RLPromptSource(unseen, sp, _Cache(), _Builder(), future_horizon=2, future_includes_target=True)
    held = {e.target for e in sp.valid + sp.test}
    for fut in src.batch(0, 16).future:
        assert fut and not set(fut) & held


@pytest.mark.parametrize("include", [False, True])
def test_prompt_future_from_the_target_on_only_when_asked(include):
    sp = _splits()
    src = RLPromptSource(sp.train, sp, _Cache(), _Builder(), future_horizon=2, future_includes_target=include)
    batch = src.batch(0, 8)
    assert len(batch.future) == 8
    for h, fut in zip(batch.history, batch.future):
        (ex,) = [e for e in sp.train if list(e.history) == h]
        seq = sp.train_sequences[ex.user_id]
        want = seq[ex.position:ex.position + 2] if include else seq[ex.position + 1:ex.position + 3]
        assert fut == want and (ex.target in fut) == include


def test_rl_config_future_includes_target_defaults_off():
    assert RLConfig().future_includes_target is False
    assert RLConfig(future_includes_target=True, future_horizon=1).future_includes_target is True


def test_held_out_monitor_scores_valid_examples_against_their_own_target():
    sp = _splits()
    plain = RLPromptSource(sp.valid, sp, _Cache(), _Builder(), future_horizon=1, future_includes_target=True)
    assert all(f == [] for f in plain.fixed_batch(4).future)  # future_items never returns held-out targets
    src = RLPromptSource(sp.valid, sp, _Cache(), _Builder(), future_horizon=1, future_includes_target=True,
                         held_out_targets=True)
    batch = src.fixed_batch(4)
    for h, fut in zip(batch.history, batch.future):
        (ex,) = [e for e in sp.valid if list(e.history) == h]
        assert fut == [ex.target] and ex.target not in sp.train_sequences[ex.user_id]
    with pytest.raises(ValueError, match="valid/test examples only"):
        RLPromptSource(sp.train, sp, _Cache(), _Builder(), held_out_targets=True)


def test_rl_refuses_a_vq_tokenizer_that_is_not_the_sft_checkpoints_own(tmp_path):
    # data.tokenizer=vq: the work_dir's VQ is retrained over when another run changes the VQ
    # settings there; the RL run then encoded histories / targets with codes the SFT policy never
    # saw, and the check (PatchKMeans only) let it through
    import yaml

    from pgen_engine.config import load_config
    from pgen_engine.eval.demo import CONFIGS
    from pgen_engine.models.tiny import make_tiny_checkpoint
    from pgen_engine.models.vq_tokenizer import JanusVQTokenizer
    from pgen_engine.training.rl_env import check_tokenizer_matches_checkpoint
    from pgen_engine.training.sft_data import DataPrepError

    sft = make_tiny_checkpoint(tmp_path / "sft" / "final", seed=1)
    other = make_tiny_checkpoint(tmp_path / "other", seed=2)
    cfg = load_config(CONFIGS / "movielens_rl.yaml", [f"model.checkpoint={sft}", f"data.work_dir={tmp_path / 'w'}"])
    own, retrained = JanusVQTokenizer.from_checkpoint(sft), JanusVQTokenizer.from_checkpoint(other)
    check_tokenizer_matches_checkpoint(cfg, own)
    with pytest.raises(DataPrepError, match=r"its VQ \(vqmodel.*is not this run's image tokenizer"):
        check_tokenizer_matches_checkpoint(cfg, retrained)
    # an SFT run that trained its VQ: the checkpoint's copy is no reference
    (tmp_path / "sft" / "config.resolved.yaml").write_text(yaml.safe_dump({"train": {"trainable": ["vqmodel"]}}))
    check_tokenizer_matches_checkpoint(cfg, retrained)


def test_rl_vq_check_accepts_the_sft_vq_exported_in_bf16(tmp_path):
    # a bf16 SFT run exports its frozen VQ rounded to bf16: still the same tokenizer
    from pgen_engine.config import load_config
    from pgen_engine.eval.demo import CONFIGS
    from pgen_engine.models.tiny import make_tiny_checkpoint
    from pgen_engine.models.vq_tokenizer import JanusVQTokenizer
    from pgen_engine.training.rl_env import check_tokenizer_matches_checkpoint

    f32 = make_tiny_checkpoint(tmp_path / "f32", seed=1)
    tok = JanusVQTokenizer.from_checkpoint(f32)
    from pgen_engine.models import load_model

    bf16 = tmp_path / "sft" / "final"
    load_model(f32, dtype=torch.bfloat16).save_pretrained(bf16)
    assert JanusVQTokenizer.from_checkpoint(bf16).fingerprint() != tok.fingerprint()  # rounded: an exact check fails
    cfg = load_config(CONFIGS / "movielens_rl.yaml", [f"model.checkpoint={bf16}", f"data.work_dir={tmp_path / 'w'}"])
    check_tokenizer_matches_checkpoint(cfg, tok)


def test_ensure_reward_embedder_trains_metadata_pairs_from_item_fields(tmp_path):
    ids = [f"i{n}" for n in range(8)]
    tints = torch.tensor([[200, 0, 0], [0, 0, 200]], dtype=torch.uint8)
    cache = SimpleNamespace(codes=lambda chunk: torch.tensor([int(i[1:]) for i in chunk]))
    decode = lambda codes: tints[codes % 2].view(-1, 1, 1, 3).expand(-1, 32, 32, 3).contiguous()  # noqa: E731
    seqs = {"u0": ["i0", "i1", "i2"], "u1": ["i3", "i4", "i5"], "u2": ["i6", "i7", "i0"]}
    spec = {"type": "cocons_cnn", "path": str(tmp_path / "r"), "steps": 2, "batch_size": 8, "width": 4, "dim": 8,
            "metadata_frac": 0.5, "metadata_field": "tint"}
    with pytest.raises(RLConfigError, match="rl.embedder: .*no two train-split items share"):
        ensure_reward_embedder(spec, decode, cache, ids, seqs, [{} for _ in ids])
    ensure_reward_embedder(spec, decode, cache, ids, seqs, [{"tint": f"t{n % 2}"} for n in range(8)])
    meta = json.loads((tmp_path / "r" / "reward_embedder.json").read_text())
    assert meta["metadata_groups"] == 2 and meta["config"]["metadata_frac"] == 0.5
