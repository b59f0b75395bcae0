"""Report pieces: grids, curves, markdown/html."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgen_engine.eval.report import image_grid, plot_curves, read_metrics, save_png, write_report


def test_image_grid_shape_and_content(tmp_path):
    a = torch.full((3, 8, 8, 3), 200, dtype=torch.uint8)
    b = torch.zeros((1, 8, 8, 3), dtype=torch.uint8)
    g = image_grid([("history", a), ("next", b)], scale=2, pad=2, label_width=10)
    assert g.dtype == np.uint8 and g.shape[2] == 3
    assert g.shape[0] == 2 * (16 + 2) + 2 and g.shape[1] == 10 + 3 * (16 + 2) + 2
    assert (g[2:18, 12:28] == 200).all() and (g[20:36, 12:28] == 0).all()
    save_png(tmp_path / "g.png", g)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        image_grid([])


def test_curves_and_metrics_reader(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(5)) + "\n")
    rows = read_metrics(f)
    assert len(rows) == 5 and read_metrics(tmp_path / "missing.jsonl") == []
    assert plot_curves(tmp_path / "c.png", {"run": rows}, ["loss"], "t")
    assert not plot_curves(tmp_path / "d.png", {"run": rows}, ["reward"], "t")
    f.write_text('{"step": 1}\n{broken\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(f)


def test_write_report_md_and_html(tmp_path):
    table = "| system | a |\n|---|---|\n| x | 0.5 |"
    p = write_report(tmp_path, title="T", table_md=table, notes=["note <b>"], figures=[("fig", "g.png")],
                     meta={"device": "cpu"})
    md = p.read_text()
    assert "| x | 0.5 |" in md and "![fig](g.png)" in md and "**device**: cpu" in md
    html = (tmp_path / "report.html").read_text()
    assert "<td>0.5</td>" in html and "note &lt;b&gt;" in html


def test_a_new_report_json_removes_the_old_markdown_until_the_new_one_is_written(tmp_path):
    from pgen_engine.eval.report import build_report_json, write_report_json

    table = "| system | a |\n|---|---|\n| x | 0.5 |"
    write_report(tmp_path, title="old", table_md=table, notes=[], figures=[], meta={})
    per_user = {"generate_sft": {"future_sim": torch.rand(4, dtype=torch.float64)}}
    write_report_json(tmp_path / "report.json", build_report_json("d", [0], 2, {"type": "eval_cnn"}, per_user))
    # a run stopped here (before the figures and the markdown) leaves no report.md of the old numbers
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.html").exists()
    assert json.loads((tmp_path / "report.json").read_text())["users"] == 4
    with pytest.raises(TypeError):  # a report that cannot be written keeps the old set whole
        write_report(tmp_path, title="old", table_md=table, notes=[], figures=[], meta={})
        write_report_json(tmp_path / "report.json", {"bad": object()})
    assert (tmp_path / "report.md").exists() and json.loads((tmp_path / "report.json").read_text())["users"] == 4
