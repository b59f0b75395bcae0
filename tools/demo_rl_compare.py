"""Compare RL checkpoints with their SFT checkpoint and copy_last on a finished synthetic demo.

Uses a `pgen demo` output folder (its data, token cache, reward embedder and evaluator) and
the demo's evaluation code: sampling chosen per system on validation (the demo's grid, or one
fixed setting), then generation on a split, per-user metrics and paired bootstrap 95 % CIs of
``generate_sft_rl - generate_sft`` and ``- copy_last`` (and ``generate_sft - copy_last``).
For tuning RL without re-running the whole demo::

    PYTHONPATH=. python tools/demo_rl_compare.py --demo runs/demo --sft runs/demo/seed0/sft/final \
        --rl runs/demo/seed0/rl/final --split test --users 0 --images 10 --select --seed 0

``--users 0`` = every user of the split; ``--select`` = the demo's validation selection
(SELECT_USERS valid users x 2 images over SAMPLING_GRID); otherwise ``--sampling G,T`` is used for every
generated system. Prints one JSON object (also written to ``--out`` when given).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pgen_engine.config import load_config
from pgen_engine.eval import evaluate as E
from pgen_engine.eval.demo import SAMPLING_GRID, SELECT_USERS, builder_for
from pgen_engine.eval.evaluator import EvalEmbedder
from pgen_engine.eval.stats import bootstrap_indices, mean_ci, paired_ci
from pgen_engine.generation.generator import Generator
from pgen_engine.io_utils import atomic_write_json
from pgen_engine.models import load_model
from pgen_engine.rewards.embedders import make_embedder
from pgen_engine.training.rl_env import reward_embedder_spec
from pgen_engine.training.sft_data import work_dir

METRIC = "attr_acc_future"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", required=True, help="a finished `pgen demo` output folder (data/, data_work/, evaluator/)")
    p.add_argument("--sft", required=True, help="the SFT checkpoint (final/) the RL runs started from")
    p.add_argument("--rl", nargs="+", required=True, help="RL checkpoints (final/) to compare")
    p.add_argument("--rl-config", default=None, help="an RL run's config.resolved.yaml (reward embedder); "
                                                    "default: the first --rl run's")
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    p.add_argument("--users", type=int, default=300, help="0 = all users of the split")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--sampling", default="2,0.7", help="guidance,temperature for every generated system")
    p.add_argument("--select", action="store_true", help="choose sampling per system on validation (demo grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    demo = Path(a.demo).resolve()
    sft_ckpt = Path(a.sft).resolve()
    rl_cfg = load_config(Path(a.rl_config) if a.rl_config else Path(a.rl[0]).resolve().parent / "config.resolved.yaml")
    sft_model = load_model(sft_ckpt)
    settings = E.PromptSettings.for_checkpoint(sft_ckpt)
    tok = settings.tokenizer(sft_model)
    reference = make_embedder(reward_embedder_spec(rl_cfg.rl, work_dir(rl_cfg)))
    ev = E.prepare_eval_data(demo / "data", tok, demo / "data_work" / f"eval_cache_{tok.fingerprint()[:16]}",
                             reference, k=settings.history_k, progress=False)
    evaluator = EvalEmbedder.load(demo / "evaluator")
    ev.catalogue_embeds = evaluator.embed(ev.catalogue_images).cpu()
    ev.reference_embeds = reference.embed(ev.catalogue_images).cpu()
    examples = ev.examples(a.split, a.users or None, seed=0)
    valid = ev.examples("valid", SELECT_USERS, seed=1)
    n, batch = a.images, max(1, 64 // a.images)
    builder = builder_for(sft_model, sft_ckpt)
    g, t = (float(x) for x in a.sampling.split(","))
    models = {"generate_sft": sft_model, **{f"generate_sft_rl[{i}]": load_model(r) for i, r in enumerate(a.rl)}}
    systems = {"copy_last": E.copy_last_system(ev, examples, n)}
    chosen = {}
    for name, model in models.items():
        gen = Generator(model, max_batch_size=batch * n)
        st = {"guidance_scale": g, "temperature": t}
        if a.select:
            def make(s, gen=gen):
                return E.generate_system(name, gen, ev, builder, valid, 2, seed=10_000 + a.seed, batch_prompts=batch,
                                         **s)

            st, _ = E.select_sampling(make, ev, valid, evaluator, SAMPLING_GRID, METRIC)
        chosen[name] = st
        systems[name] = E.generate_system(name, gen, ev, builder, examples, n, seed=a.seed, batch_prompts=batch, **st)
    per_user = {k: E.per_user_metrics(o, ev, examples, evaluator)[METRIC] for k, o in systems.items()}
    idx = bootstrap_indices(len(examples), 1000, 0)
    res = {"split": a.split, "users": len(examples), "images": n, "seed": a.seed, "sft": str(sft_ckpt),
           "rl": a.rl, "sampling": chosen, "metric": METRIC,
           "systems": {k: mean_ci(v, idx) for k, v in per_user.items()},
           "paired": {"generate_sft - copy_last": paired_ci(per_user["generate_sft"], per_user["copy_last"], idx)}}
    for i in range(len(a.rl)):
        k = f"generate_sft_rl[{i}]"
        res["paired"][f"{k} - generate_sft"] = paired_ci(per_user[k], per_user["generate_sft"], idx)
        res["paired"][f"{k} - copy_last"] = paired_ci(per_user[k], per_user["copy_last"], idx)
    res["seconds"] = round(time.time() - t0, 1)
    if a.out:
        atomic_write_json(Path(a.out), res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
