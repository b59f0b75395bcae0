"""metrics.jsonl reading on resume and metrics over ranks (``training/metrics.py``)."""
from __future__ import annotations

import pytest
import torch

from pgen_engine.training import metrics as metrics_mod
from pgen_engine.training.metrics import MetricsLogger, read_metrics, reduce_row


def test_resume_over_a_hand_edited_or_damaged_metrics_file(tmp_path):
    # a line holding valid JSON that is not a row ([1, 2], "x", a string step) or bytes that are
    # not UTF-8 used to stop the resume with an AttributeError / ValueError / UnicodeDecodeError
    log = MetricsLogger(tmp_path, is_main=True, total_steps=5, progress=False)
    for s in range(1, 4):
        log.log({"step": s, "loss": 1.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"x"\n{"step": "4"}\n{"step": true}\n\xff\xfe{"step": 5\n')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    log = MetricsLogger(tmp_path, is_main=True, total_steps=5, start_step=2, progress=False)
    log.log({"step": 3, "loss": 2.0})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 2.0


def test_reduce_row_gives_the_all_rank_min_max_and_std(monkeypatch):
    # reward/<c>/{min,max,std} were the mean of the ranks' values (reduce_row took max only for
    # '*_max'): on 2 ranks the logged max/min were not any rank's extreme and the std was not the
    # batch's. Two ranks simulated: rank 1's tensors are captured, then combined with rank 0's.
    r0, r1 = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([10.0, 11.0, 12.0, 13.0])

    def row(r):
        return {"step": 1, "reward": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
                "reward/a": float(r.mean()), "reward/a/std": float(r.std(unbiased=False)),
                "reward/a/min": float(r.min()), "reward/a/max": float(r.max()), "ratio_max": float(r.max()),
                "kl": float(r.mean())}

    captured = []
    monkeypatch.setattr(metrics_mod, "all_reduce", lambda t, op="sum": captured.append(t.clone()) or t)
    reduce_row(row(r1), 2)
    ops = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}
    calls = iter(captured)
    monkeypatch.setattr(metrics_mod, "all_reduce", lambda t, op="sum": ops[op](t, next(calls)))
    got = reduce_row(row(r0), 2)
    every = torch.cat([r0, r1])
    assert got["step"] == 1
    assert got["reward/a/min"] == 0.0 and got["reward/a/max"] == 13.0 and got["ratio_max"] == 13.0
    assert got["reward"] == pytest.approx(float(every.mean())) and got["kl"] == pytest.approx(float(every.mean()))
    assert got["reward/a/std"] == pytest.approx(float(every.std(unbiased=False)))
    assert got["reward_std"] == pytest.approx(float(every.std(unbiased=False)))
