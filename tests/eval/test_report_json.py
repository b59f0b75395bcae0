"""report.json shape, CI tables, verdict sentences and the paired plot."""
from __future__ import annotations

import torch

from pgen_engine.eval.report import build_report_json, ci_table, paired_sentences, plot_paired


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
                                "generate_nonpersonal - copy_last", "generate_sft_rl - copy_last"}
    d = r["paired"]["generate_sft_rl - copy_last"]["future_sim"]
    assert abs(d["mean"] - 0.1) < 1e-9 and d["ci95"][0] > 0.099  # a constant shift has a tight CI
    text = " ".join(paired_sentences(r, ["generate_sft_rl"], ["future_sim", "diversity"]))
    assert "beats it on future_sim" in text and "no difference on diversity" in text
    assert "| generate_sft_rl |" in ci_table(r, ["future_sim"])
    assert plot_paired(tmp_path / "p.png", r, ["future_sim", "diversity"]) and (tmp_path / "p.png").stat().st_size > 0
