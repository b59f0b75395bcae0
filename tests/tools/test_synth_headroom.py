"""tools/synth_headroom.py: the drift rule it learns from train sequences, and its report."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from pgen_engine.data.dataset import load_dataset
from pgen_engine.data.splits import build_splits
from pgen_engine.data.synth import ATTRIBUTES, VALUES, SynthConfig, attributes_to_codes, drift_rules, generate_synthetic

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "synth_headroom.py"


def _tool():
    spec = importlib.util.spec_from_file_location("synth_headroom", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(tmp_path, **kw):
    cfg = SynthConfig(num_users=80, num_items=300, seed=3, drift=0.0, **kw)
    return generate_synthetic(tmp_path / "ds", cfg)


def test_learn_successors_recovers_the_drift_rule(tmp_path):
    # noiseless users who always follow the rule: every observed change is succ[v]
    root = _data(tmp_path, fidelity=1.0, rule_prob=1.0)
    ds = load_dataset(root, check_images=False)
    sp = build_splits(ds, k=4)
    attrs = json.loads((root / "attributes.json").read_text())
    item_attrs = {i: list(attributes_to_codes(a)) for i, a in attrs.items()}
    succ = _tool().learn_successors(sp.train_sequences, item_attrs)
    truth = drift_rules(3)
    for j, a in enumerate(ATTRIBUTES):
        assert succ[j] == {v: int(truth[j][v]) for v in range(len(VALUES[a]))}, a


def test_report_scores_copy_last_and_rule(tmp_path):
    root = _data(tmp_path, fidelity=1.0, rule_prob=1.0)
    r = subprocess.run([sys.executable, str(TOOL), str(root), "--split", "test"], capture_output=True, text=True,
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["split"] == "test" and rep["users"] == 80
    # noiseless data with a full catalogue: a window without a change is due for one, so the rule
    # is exact there, and it never does worse than copying the last value
    rule, copy = rep["rule"], rep["copy_last"]
    change = next(v for k, v in rule.items() if k.startswith("change"))
    assert change[0] == 1.0 and change[2] == 1.0
    assert rule["attr_acc_future"] > copy["attr_acc_future"]
