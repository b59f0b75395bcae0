"""How well does an RL reward point at what the user wants next? (synthetic data only)

    python tools/reward_alignment.py runs/demo/data [--windows 1500]
        [--reward-embedder runs/demo/data_work/reward_embedder]

For a random sample of train windows, every catalogue item is scored by each candidate
reward (pixel-statistics cosines, and with ``--reward-embedder`` the learned co-consumption
CNN the demo's RL reward uses, ``rl.embedder: {type: cocons_cnn}``) and compared with
the ground-truth preference at the window's target step. Printed per reward: ``top``, the
attribute match of the item the reward ranks first (what a perfectly optimised policy would
show); ``spearman``, the rank correlation of reward and attribute match over the catalogue;
and for reference the match of the last history item (copy_last).

The ground truth is read here only to *score* rewards offline; the rewards themselves see
item images and the user's train-split sequence, as in training.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from pgen_engine.data.dataset import load_dataset, load_image
from pgen_engine.data.splits import build_splits
from pgen_engine.data.synth import attributes_to_codes, load_ground_truth, read_attributes
from pgen_engine.rewards.cocons import CoConsumptionEmbedder
from pgen_engine.rewards.embedders import make_embedder


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a synthetic dataset folder (with ground_truth.jsonl)")
    ap.add_argument("--windows", type=int, default=1500)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reward-embedder", default=None,
                    help="a trained cocons_cnn reward embedder folder (the RL stage writes one into "
                         "data.work_dir/reward_embedder); adds its candidates to the table")
    a = ap.parse_args()
    ds = load_dataset(a.data, check_images=False)
    sp = build_splits(ds, k=a.k, max_windows_per_user=8)
    gt = load_ground_truth(a.data)
    ids = list(ds.items)
    ix = {i: n for n, i in enumerate(ids)}
    imgs = torch.from_numpy(np.stack([load_image(ds.items[i].image_path, 32) for i in ids]))
    attrs = read_attributes(imgs)
    e = make_embedder({"type": "pixel_stats"}).embed(imgs).float()
    sim = e @ e.T  # [C, C] cosines
    sim_cnn = None
    if a.reward_embedder:
        with torch.no_grad():
            f = CoConsumptionEmbedder.load(a.reward_embedder).embed(imgs).float()
        f = torch.nn.functional.normalize(f, dim=-1)
        sim_cnn = f @ f.T  # catalogue items: snap (nearest item) is the identity, so plain cosines rank them
    rng = np.random.default_rng(a.seed)
    pick = rng.choice(len(sp.train), min(a.windows, len(sp.train)), replace=False)
    rows: dict[str, list[tuple[float, float]]] = {}
    copy = []
    for i in pick:
        ex = sp.train[i]
        seq = sp.train_sequences[ex.user_id]
        pref = torch.tensor(attributes_to_codes(gt[ex.user_id][ex.position]["preferred"]))
        match = (attrs == pref).double().mean(1)  # [C]
        hist = [ix[h] for h in ex.history]
        after = [ix[j] for j in seq[ex.position + 1:ex.position + 5]]  # strictly after the target
        nxt = ix[seq[ex.position]]  # the window's own target (a train-split item)
        copy.append(float(match[hist[-1]]))
        cands = {"history mean (old 'preference')": sim[:, hist].mean(1),
                 "max over items 1-4 after the target (old future_interest)":
                     sim[:, after].max(1).values if after else None,
                 "old demo total (+ 0.2 x history mean)":
                     (sim[:, after].max(1).values if after else 0) + 0.2 * sim[:, hist].mean(1),
                 "next item (future_includes_target, horizon 1)": sim[:, nxt]}
        if sim_cnn is not None:
            cands["cocons_cnn: history mean"] = sim_cnn[:, hist].mean(1)
            cands["cocons_cnn: next item (the demo's RL reward)"] = sim_cnn[:, nxt]
        for name, r in cands.items():
            if r is None:
                continue
            r = r + 1e-6 * torch.rand(len(ids), generator=torch.Generator().manual_seed(int(i)))  # break ties
            rows.setdefault(name, []).append((float(match[r.argmax()]), _spearman(r, match)))
    print(f"{len(pick)} train windows; attribute match with the target-step preference")
    print(f"  copy_last (last history item): {np.mean(copy):.3f}")
    for name, v in rows.items():
        arr = np.array(v)
        print(f"  {name}: top {arr[:, 0].mean():.3f}, spearman {np.nanmean(arr[:, 1]):.3f} (n={len(arr)})")


if __name__ == "__main__":
    main()
