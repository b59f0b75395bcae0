"""DeepSpeed stays behind pgen_engine/training/engine.py, and a missing DeepSpeed is one clear line."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pgen_engine.training.engine as E

PKG = Path(E.__file__).resolve().parents[1]
REPO = PKG.parent
# attributes that belong to DeepSpeed's internals (ZeRO-3 parameter/optimizer/hook objects)
DEEPSPEED_INTERNALS = {"_register_deepspeed_module", "ds_active_sub_modules", "parameter_offload", "forward_hooks",
                       "backward_hooks", "ds_tensor", "ds_id", "ds_status", "ds_numel",
                       "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"}


def deepspeed_uses(path: Path) -> list[str]:
    """``file:line what`` for each deepspeed import or DeepSpeed-internal attribute/name in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
            found.append(f"{path}:{node.lineno} import deepspeed")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
            found.append(f"{path}:{node.lineno} from {node.module} import")
        elif isinstance(node, ast.Attribute) and node.attr in DEEPSPEED_INTERNALS:
            found.append(f"{path}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in DEEPSPEED_INTERNALS:
            found.append(f"{path}:{node.lineno} {node.value!r}")  # getattr(x, "ds_tensor")
    return found


def test_scanner_finds_deepspeed_uses(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import deepspeed.comm\nfrom deepspeed import zero\n"
                     "def f(p, po):\n    p.ds_active_sub_modules.clear()\n    return getattr(p, 'ds_tensor', None)\n")
    assert {x.split(" ", 1)[1] for x in deepspeed_uses(probe)} == {
        "import deepspeed", "from deepspeed import", ".ds_active_sub_modules", "'ds_tensor'"}


def test_only_engine_py_touches_deepspeed():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path != Path(E.__file__).resolve():
            offenders += deepspeed_uses(path)
    assert not offenders, "DeepSpeed used outside pgen_engine/training/engine.py:\n" + "\n".join(offenders)


def test_require_deepspeed_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(E, "deepspeed", None)
    with pytest.raises(E.DeepSpeedMissingError) as e:
        E.require_deepspeed()
    assert "pip install deepspeed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.e2e
def test_train_py_without_deepspeed_prints_one_error_line(tmp_path):
    code = ("import sys; sys.modules['deepspeed'] = None; sys.argv = ['train.py'] + sys.argv[1:]\n"
            "import runpy; runpy.run_path('train.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", code, "--config", "configs/demo_sft.yaml", f"output_dir={tmp_path / 'o'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == ["error: training needs DeepSpeed, which is not installed: pip install "
                                             "deepspeed (or pip install -r requirements-dev.txt)"], p.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_pgen_commands_do_not_import_deepspeed_until_training_starts():
    # importing DeepSpeed logs an accelerator warning on CPU machines: every `pgen` command
    # (`pgen --help` included) printed it, because the eval / demo modules import the trainer
    code = ("import sys, pgen_engine.cli, pgen_engine.eval.demo, pgen_engine.training.stages\n"
            "print('deepspeed' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.strip() == "False", p.stderr[-2000:]
    assert "accelerator" not in p.stderr
