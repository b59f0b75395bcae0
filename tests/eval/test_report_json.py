"""report.json shape, CI tables, verdict sentences and the paired plot."""
from __future__ import annotations

import torch

from pgen_engine.eval.report import build_report_json, ci_table, paired_keys, paired_sentences, plot_paired


def test_report_json_exact_shape_and_verdicts(tmp_path):
    g = torch.Generator().manual_seed(0)
    U = 100
    base = torch.rand(U, generator=g, dtype=torch.float64)
    per_user = {
        "copy_last": {"future_sim": base, "diversity": torch.rand(U, generator=g, dtype=torch.float64)},
        "generate_nonpersonal": {"future_sim": base - 0.2, "diversity": torch.rand(U, generator=g, dtype=torch.float64)},
        "generate_sft_rl": {"future_sim": base + 0.1, "diversity": torch.rand(U, generator=g, dtype=torch.float64)},
    }
    r = build_report_json("ds", [0, 1, 2], 10, {"type": "eval_cnn"}, per_user, draws=300)
    assert list(r) == ["dataset", "seeds", "users", "images_per_user", "evaluator", "systems", "paired"]
    assert r["users"] == U and r["seeds"] == [0, 1, 2] and r["images_per_user"] == 10
    cell = r["systems"]["generate_sft_rl"]["future_sim"]
    assert set(cell) == {"mean", "ci95"} and len(cell["ci95"]) == 2 and isinstance(cell["mean"], float)
    assert set(r["paired"]) == {"copy_last - generate_nonpersonal", "generate_sft_rl - generate_nonpersonal",
                                "generate_nonpersonal - copy_last", "generate_sft_rl - copy_last"}  # no retrieve/sft rows
    d = r["paired"]["generate_sft_rl - copy_last"]["future_sim"]
    assert abs(d["mean"] - 0.1) < 1e-9 and d["ci95"][0] > 0.099  # a constant shift has a tight CI
    text = " ".join(paired_sentences(r, ["generate_sft_rl"], ["future_sim", "diversity"]))
    assert "beats it on future_sim" in text and "no difference on diversity" in text
    assert "| generate_sft_rl |" in ci_table(r, ["future_sim"])
    assert plot_paired(tmp_path / "p.png", r, ["future_sim", "diversity"]) and (tmp_path / "p.png").stat().st_size > 0


def test_paired_covers_retrieve_and_rl_vs_sft():
    """"RL improves on SFT" and "generation beats retrieval" are decided by paired CIs in report.json."""
    g = torch.Generator().manual_seed(2)
    U = 300
    base = torch.rand(U, generator=g, dtype=torch.float64)  # between-user spread >> the effects below
    noise = lambda: 0.02 * torch.randn(U, generator=g, dtype=torch.float64)  # noqa: E731
    per_user = {name: {"attr_acc_future": base + shift + noise()} for name, shift in (
        ("copy_last", 0.0), ("retrieve", -0.05), ("generate_nonpersonal", -0.3),
        ("generate_sft", 0.02), ("generate_sft_rl", 0.05))}
    per_user["generate_sft"]["diversity"] = torch.rand(U, generator=g, dtype=torch.float64)
    r = build_report_json("ds", [0], 10, {}, per_user, draws=500)
    keys = list(r["paired"])
    assert keys == [f"{a} - {b}" for a, b in paired_keys(per_user)]
    assert "generate_sft_rl - generate_sft" in keys and "generate_sft - generate_sft_rl" not in keys
    for s in ("generate_sft_rl", "generate_sft", "generate_nonpersonal", "copy_last"):
        assert f"{s} - retrieve" in keys
    assert len(keys) == len(set(keys)) == 4 * 3 + 1  # 4 others x 3 baselines + the RL-vs-SFT claim
    # with the random floor present, both personalised rows are paired against it too
    per_rand = {**per_user, "random": {"attr_acc_future": base - 0.3 + noise()}}
    keys_r = list(build_report_json("ds", [0], 10, {}, per_rand, draws=50)["paired"])
    assert {"generate_sft - random", "generate_sft_rl - random"} <= set(keys_r)
    assert "generate_nonpersonal - random" not in keys_r and "random - generate_nonpersonal" in keys_r
    d = r["paired"]["generate_sft_rl - generate_sft"]
    assert set(d) == {"attr_acc_future"}  # metrics both systems have
    assert abs(d["attr_acc_future"]["mean"] - 0.03) < 0.01 and d["attr_acc_future"]["ci95"][0] > 0
    assert set(d["attr_acc_future"]) == {"mean", "ci95"}
    text = " ".join(paired_sentences(r, ["generate_sft_rl"], ["attr_acc_future"]))
    assert "**generate_sft_rl vs generate_sft**" in text and "**generate_sft_rl vs retrieve**" in text
    # RL worse than SFT reads as worse, not as "beats"
    per_user["generate_sft_rl"]["attr_acc_future"] = per_user["generate_sft"]["attr_acc_future"] - 0.05
    r2 = build_report_json("ds", [0], 10, {}, per_user, draws=500)
    s2 = [t for t in paired_sentences(r2, ["generate_sft_rl"], ["attr_acc_future"]) if "vs generate_sft**" in t]
    assert len(s2) == 1 and "is worse on attr_acc_future" in s2[0] and "beats" not in s2[0]


def test_paired_keys_without_sft_or_retrieve():
    """`pgen eval` without --baselines has one system: no pairs; the claim pair needs both systems."""
    assert paired_keys(["generate_sft_rl"]) == []
    assert paired_keys(["generate_sft_rl", "generate_sft"]) == [("generate_sft_rl", "generate_sft")]
    assert paired_keys(["tiny", "retrieve"]) == [("tiny", "retrieve")]


def test_results_markdown_names_the_evaluator_sanity_and_spread():
    from pgen_engine.eval.report import results_markdown

    U = 20
    per_user = {"copy_last": {"future_sim": torch.linspace(0, 1, U, dtype=torch.float64)},
                "generate_sft_rl": {"future_sim": torch.linspace(0.1, 1.1, U, dtype=torch.float64)}}
    san = {"recall@10": 0.0077, "recall@10_pixel_stats": 0.0067, "recall@10_chance": 0.0034}
    for spread, want in ((None, None), (0.33, "mean pairwise cosine 0.33")):
        ev = {"type": "eval_cnn", "independent": True,
              "sanity": dict(san, **({"mean_cosine": spread} if spread is not None else {}))}
        r = build_report_json("ds", [0], 10, ev, per_user, draws=100)
        head = results_markdown(r, ["future_sim"], ["future_sim"], systems=["generate_sft_rl"]).splitlines()[0]
        assert "recall@10 0.008 vs pixel statistics 0.007, chance 0.003" in head
        assert (want in head) if want else ("cosine" not in head), head
