"""metrics.jsonl reading on resume (``training/metrics.py``)."""
from __future__ import annotations

from pgen_engine.training.metrics import MetricsLogger, read_metrics


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
