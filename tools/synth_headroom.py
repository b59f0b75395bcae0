"""How much of the synthetic benchmark's attr_acc_future is left above a model? (synthetic data only)

    python tools/synth_headroom.py runs/demo/data [--split valid] [--k 4]
        [--checkpoint runs/demo/seed0/sft/final --demo runs/demo --sampling 2,0.3 --images 4]

Prints, for the split's targets, per attribute (shape, colour, pattern, background) the
share matching the ground-truth preference at the target step for:

* ``copy_last``: the last history item's value;
* ``rule``: a two-line predictor a model could learn from the train split -- the drift rule
  ``succ`` is estimated from consecutive train items (for each value, the most frequent
  *other* value that follows it), then per attribute: if the history window already shows a
  change, keep the last value, else predict ``succ[last]`` (preferences move every
  ``dwell`` = window length steps, so a window without a change is due for one);
* with ``--checkpoint``: the model's generated images (read from pixels), at one sampling
  setting, plus how often they show the last value or ``succ[last]``.

Each is split into "keep" attributes (the window shows a change) and "change" attributes
(it does not). The ground truth is read only to score; ``rule`` sees what a model sees (the
history items' images, and the train split's sequences through ``succ``).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch

from pgen_engine.data.dataset import load_dataset, load_image
from pgen_engine.data.splits import build_splits
from pgen_engine.data.synth import ATTRIBUTES, attributes_to_codes, load_ground_truth, read_attributes


def learn_successors(train_sequences: dict[str, list[str]], item_attrs: dict[str, list[int]]) -> list[dict[int, int]]:
    """Per attribute, value -> the most frequent different value that follows it in the train sequences."""
    counts = [Counter() for _ in ATTRIBUTES]
    for seq in train_sequences.values():
        for a, b in zip(seq, seq[1:]):
            for j in range(len(ATTRIBUTES)):
                va, vb = item_attrs[a][j], item_attrs[b][j]
                if va != vb:
                    counts[j][(va, vb)] += 1
    out: list[dict[int, int]] = []
    for c in counts:
        best: dict[int, tuple[int, int]] = {}
        for (va, vb), n in c.items():
            if n > best.get(va, (-1, 0))[0]:
                best[va] = (n, vb)
        out.append({va: vb for va, (_, vb) in best.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a synthetic dataset folder (with ground_truth.jsonl)")
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--k", type=int, default=4, help="history window (the demo's data.history_k)")
    ap.add_argument("--checkpoint", default=None, help="also score this checkpoint's generations (needs --demo)")
    ap.add_argument("--demo", default=None, help="the `pgen demo` folder the checkpoint belongs to (its data_work)")
    ap.add_argument("--sampling", default="2,0.3", help="guidance,temperature for --checkpoint")
    ap.add_argument("--images", type=int, default=4, help="images per user for --checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.checkpoint and not a.demo:
        ap.error("--checkpoint needs --demo")
    ds = load_dataset(a.data, check_images=False)
    sp = build_splits(ds, k=a.k, max_windows_per_user=8)
    gt = load_ground_truth(a.data)
    ids = list(ds.items)
    imgs = torch.from_numpy(np.stack([load_image(ds.items[i].image_path, 32) for i in ids]))
    item_attrs = dict(zip(ids, read_attributes(imgs).tolist()))
    succ = learn_successors(sp.train_sequences, item_attrs)
    examples = sp.valid if a.split == "valid" else sp.test
    pref = [attributes_to_codes(gt[ex.user_id][ex.position]["preferred"]) for ex in examples]
    hist = [[item_attrs[h] for h in ex.history] for ex in examples]

    def case(u: int, j: int) -> str:
        vals = [h[j] for h in hist[u]]
        return "keep" if any(x != y for x, y in zip(vals, vals[1:])) else "change"

    def rule(u: int, j: int) -> int:
        last = hist[u][-1][j]
        return last if case(u, j) == "keep" else succ[j].get(last, last)

    preds = {"copy_last": lambda u, j: [hist[u][-1][j]], "rule": lambda u, j: [rule(u, j)]}
    gen = None
    if a.checkpoint:
        gen = _generate(a, examples)
        preds["model"] = lambda u, j: gen[u, :, j].tolist()
    report: dict[str, dict] = {"split": a.split, "users": len(examples), "successors": [
        {str(k): v for k, v in s.items()} for s in succ]}
    for name, f in preds.items():
        hits: dict[str, list[float]] = {"all": [], "keep": [], "change": []}
        shows_last: dict[str, list[float]] = {"keep": [], "change": []}
        shows_succ: dict[str, list[float]] = {"keep": [], "change": []}
        for u in range(len(examples)):
            for j in range(len(ATTRIBUTES)):
                p, c, last = f(u, j), case(u, j), hist[u][-1][j]
                h = float(np.mean([v == pref[u][j] for v in p]))
                hits["all"].append(h)
                hits[c].append(h)
                shows_last[c].append(float(np.mean([v == last for v in p])))
                shows_succ[c].append(float(np.mean([v == succ[j].get(last, -1) for v in p])))
        report[name] = {"attr_acc_future": round(float(np.mean(hits["all"])), 4),
                        **{f"{c}: acc / shows last / shows succ[last] (n={len(hits[c])})":
                           [round(float(np.mean(hits[c])), 3), round(float(np.mean(shows_last[c])), 3),
                            round(float(np.mean(shows_succ[c])), 3)] for c in ("keep", "change") if hits[c]}}
    print(json.dumps(report, indent=1))


def _generate(a: argparse.Namespace, examples) -> torch.Tensor:
    """The checkpoint's images for ``examples`` read as attributes: int64 ``[U, images, 4]``."""
    from pathlib import Path

    from pgen_engine.eval import evaluate as E
    from pgen_engine.eval.demo import builder_for
    from pgen_engine.generation.generator import Generator
    from pgen_engine.models import load_model
    from pgen_engine.rewards.embedders import make_embedder

    ck, demo = Path(a.checkpoint).resolve(), Path(a.demo)
    model = load_model(ck)
    tok = E.PromptSettings.for_checkpoint(ck).tokenizer(model)
    ev = E.prepare_eval_data(a.data, tok, demo / "data_work" / f"eval_cache_{tok.fingerprint()[:16]}",
                             make_embedder({"type": "pixel_stats"}), k=a.k, progress=False)
    by_user = {ex.user_id: ex for ex in ev.examples(a.split, None, seed=0)}
    exs = [by_user[ex.user_id] for ex in examples]
    g, t = (float(x) for x in a.sampling.split(","))
    out = E.generate_system("model", Generator(model, max_batch_size=64), ev, builder_for(model, ck), exs,
                            a.images, seed=a.seed, batch_prompts=max(1, 64 // a.images), guidance_scale=g,
                            temperature=t)
    return read_attributes(out.images).view(len(exs), a.images, len(ATTRIBUTES))


if __name__ == "__main__":
    main()
