import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_check_mode_runs_and_ends_with_json():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    ops = {r["op"] for r in last["rows"]}
    assert {"sample_cfg_topp", "token_logprobs_fwd", "rms_norm", "apply_rotary"} <= ops
    assert all(r["ms"] > 0 for r in last["rows"] if r["op"] != "check")
    checks = [r for r in last["rows"] if r["op"] == "check"]
    assert checks and all(r["ok"] for r in checks)  # graph-ready decode == eager == transformers tokens
    backends = {r["backend"] for r in last["rows"] if r["op"] == "generate"}
    assert {"transformers", "pgen-static", "pgen-static-fp8", "pgen-eager"} <= backends
    assert (results.read_text() if results.exists() else None) == before  # check mode never appends


def test_fix_static_cache_defaults_the_prefill_chunk_size_janus_omits():
    """transformers 5.17's Janus image generate calls _prepare_static_cache without prefill_chunk_size
    (TypeError there); the fix defaults it to None and leaves callers that pass it alone."""
    from benchmarks.hf_janus import fix_static_cache

    class Model:
        def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, prefill_chunk_size,
                                  model_kwargs):
            return prefill_chunk_size

    m = Model()
    with pytest.raises(TypeError, match="prefill_chunk_size"):  # what 5.17's Janus generate hits
        m._prepare_static_cache(cache_implementation="static", batch_size=2, max_cache_len=8, model_kwargs={})
    fix_static_cache(m)
    fix_static_cache(m)  # idempotent
    assert m._prepare_static_cache(cache_implementation="static", batch_size=2, max_cache_len=8,
                                   model_kwargs={}) is None
    assert m._prepare_static_cache("static", 2, 8, 5, {}) == 5
    assert m._prepare_static_cache(cache_implementation="static", batch_size=2, max_cache_len=8,
                                   prefill_chunk_size=7, model_kwargs={}) == 7

    class Old:  # a release without the argument: nothing to fix
        def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, model_kwargs):
            return "old"

    o = Old()
    orig = o._prepare_static_cache
    fix_static_cache(o)
    assert o._prepare_static_cache == orig


def test_hf_janus_image_generate_runs_on_this_transformers(tiny_ckpt):
    """load_hf_janus gives a model whose image-mode generate runs on the installed transformers."""
    import torch

    import pgen_engine as pg
    from benchmarks.hf_janus import load_hf_janus

    hf = load_hf_janus(tiny_ckpt)
    sp = pg.SpecialTokens.builtin()
    ids = torch.tensor([[sp.bos, 7, 8, 9, sp.boi]])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", guidance_scale=2.0,
                      do_sample=False)
    assert out.shape[-1] >= pg.load_model(tiny_ckpt).num_image_tokens


def test_decode_traffic_bound_counts_weights_and_kv_bytes():
    """The bound's byte count equals a hand count on a small geometry (MHA and GQA)."""
    import torch

    import pgen_engine as pg
    from benchmarks.gpu_generation import decode_traffic_bound
    from pgen_engine.models.tiny import make_tiny_checkpoint

    for kv_heads in (4, 2):
        geo = dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=kv_heads, intermediate_size=96,
                   vocab_size=300, image_size=32, patch_size=8, codebook_size=64)
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            model = pg.load_model(make_tiny_checkpoint(d, **geo))
        lm = (model.language_model, model.generation_head, model.generation_aligner)
        params = sum(p.numel() for m in lm for p in m.parameters()) - model.language_model.embed_tokens.weight.numel()
        T, P, B = 16, 10, 3
        per_tok = 3 * 2 * kv_heads * 16  # layers * (K, V) * kv heads * head_dim
        ctx = [P + t for t in range(1, T)]  # tokens a row attends to at decode step t (code 0: the prefill)
        n = T - 1  # decode steps
        full = 2 * B * sum(ctx) / n * per_tok * 2
        shared = (B * sum(ctx) / n + B * sum(c - P for c in ctx) / n + P) * per_tok * 2
        rows = decode_traffic_bound(geo, B, P, hf_seconds=1.0, prefill_seconds=0.0, bandwidths_tbs=(1.0,))
        got = {r["variant"]: r for r in rows}
        assert torch.isclose(torch.tensor(got["bf16 K/V, one copy per row"]["bytes_per_step"]),
                             torch.tensor(2.0 * params + full), rtol=1e-9)
        assert torch.isclose(torch.tensor(got["bf16 K/V, uncond prompt shared"]["bytes_per_step"]),
                             torch.tensor(2.0 * params + shared), rtol=1e-9)
        assert abs(got["fp8 K/V, uncond prompt shared"]["kv_bytes_per_step"] - shared / 2) < 1e-6 * shared
        r = got["bf16 K/V, one copy per row"]
        assert abs(r["best_speedup"] - 1.0 / (n * r["step_s"])) < 1e-9 * r["best_speedup"]
        # shared blocks: B distinct prompts + 1 pad prompt once, every row's image tokens, plus
        # the shared-prefix kernel's split partials (2B rows x 4 heads x 1 split x (16 + 2) fp32,
        # written and read, per layer) and, fp8, the K and V scales of 2B own + B + 1 pool rows
        blocks = ((B + 1) * P + 2 * B * sum(c - P for c in ctx) / n) * per_tok
        partials = 3 * 2 * (2 * B) * 4 * 1 * (16 + 2) * 4
        scales = 3 * 2 * (2 * B + B + 1) * kv_heads * 4
        got_bf16 = got["bf16 K/V, shared blocks read once per group"]["kv_bytes_per_step"]
        assert abs(got_bf16 - (2 * blocks + partials)) < 1e-6 * blocks
        got_fp8 = got["fp8 K/V, shared blocks read once per group"]["kv_bytes_per_step"]
        assert abs(got_fp8 - (blocks + partials + scales)) < 1e-6 * blocks
        grp = {r["variant"]: r for r in decode_traffic_bound(geo, 4, P, hf_seconds=1.0, prefill_seconds=0.0,
                                                             bandwidths_tbs=(1.0,), samples_per_prompt=4)}
        one = ((1 + 1) * P + 2 * 4 * sum(c - P for c in ctx) / n) * per_tok * 2 + 3 * 2 * 8 * 4 * 1 * 18 * 4
        assert abs(grp["bf16 K/V, shared blocks read once per group"]["kv_bytes_per_step"] - one) < 1e-6 * one


# ----------------------------------------------------------------------------- gpu_smoke / wheelhouse
def _fake_wheel(path: Path, name: str, requires: list[str]) -> Path:
    import zipfile

    whl = path / f"{name}-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
        name, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return whl


def test_wheel_requirements_drop_extras_and_foreign_markers(tmp_path):
    from benchmarks.wheelhouse import EXCLUDED, wheel_requirements

    whl = _fake_wheel(tmp_path, "pkg", ["Py_CPUInfo", "pydantic>=2.0.0", "torch>=2.0.0",
                                        "pytest<8.4; extra == 'dev'", "colorama; sys_platform == 'win32'",
                                        "tomli>=1; python_version < '3.11'"])
    assert wheel_requirements(whl, "3.12") == ["py-cpuinfo", "pydantic", "torch"]
    assert "tomli" in wheel_requirements(whl, "3.10")
    assert all(EXCLUDED.match(n) for n in ("torch", "triton", "nvidia-nccl-cu13", "numpy"))
    assert not any(EXCLUDED.match(n) for n in ("deepspeed", "pydantic", "scipy", "torchmetrics"))


def _requirement_closure(roots) -> set[str]:
    """Canonical names of ``roots`` and every runtime (non-extra) requirement they pull in, from the
    installed metadata."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    from benchmarks.wheelhouse import canonical

    seen, todo = set(), [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def test_wheelhouse_covers_what_the_smoke_imports_beyond_the_gpu_image():
    """Every third-party module that `import pgen_engine` and the smoke stages load comes with the GPU
    image (torch, triton, transformers and their requirements) or from the wheelhouse (NEEDED_MODULES and
    their requirements). pillow was missing: pgen_engine imports PIL, which neither torch nor transformers
    requires."""
    import importlib.metadata as md

    from benchmarks.wheelhouse import NEEDED_MODULES, canonical

    code = ("import sys; import pgen_engine, pgen_engine.training.rl, benchmarks.smoke_stages, benchmarks.gpu_smoke, "
            "benchmarks.gpu_generation, benchmarks.gpu_ops, benchmarks.gpu_attention; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    allowed = _requirement_closure(["torch", "triton", "transformers"]) | _requirement_closure(NEEDED_MODULES)
    owners = md.packages_distributions()
    missing = {}
    for mod in out.stdout.split():
        if mod in ("pgen_engine", "benchmarks"):  # this repository (an editable install maps it to a dist)
            continue
        dists = {canonical(d) for d in owners.get(mod, [])}
        if dists and not dists & allowed:
            missing[mod] = sorted(dists)
    assert not missing, f"modules neither the GPU image nor the wheelhouse provides: {missing}"
    assert NEEDED_MODULES.get("pillow") == "PIL"


def test_wheelhouse_install_needs_wheels_and_installs_nothing_when_complete(tmp_path):
    from benchmarks.wheelhouse import install, missing_modules

    assert missing_modules({"json": "json"}) == []
    assert install(tmp_path, {"json": "json"}) == []  # nothing missing: pip is never called
    with pytest.raises(RuntimeError, match="make wheelhouse"):
        install(tmp_path, {"no-such-dist": "no_such_module_pgen_smoke"})


def test_gpu_smoke_without_gpu_refuses_and_points_at_check():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--no-results"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--check" in out.stderr


def test_gpu_smoke_spent_budget_skips_loudly_and_fails(tmp_path):
    """No stage passes silently: a stage that cannot run is 'skipped' with a reason and the exit is 1."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--check", "--out", str(tmp_path),
                          "--stages", "kernels,sft", "--total-budget", "5"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["kernels", "sft"]
    assert all(s["status"] == "skipped" and "budget" in s["reason"] for s in report["stages"])
    assert report["ok"] is False and "NOT ok" in out.stdout


@pytest.mark.e2e
def test_gpu_smoke_check_runs_every_stage_on_cpu(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--check", "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1500)
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    bad = [(s["stage"], s["status"], s["reason"]) for s in report["stages"] if s["status"] != "ok"]
    assert out.returncode == 0 and not bad, (bad, out.stdout[-3000:])
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["kernels", "ops_tests", "generator", "sft", "rl", "op_bench", "gen_bench"]
    assert report["device"] == "cpu (check mode)" and report["mode"] == "check"
    assert stages["ops_tests"]["numbers"]["passed"] > 0
    g = stages["generator"]["numbers"]
    assert g["tokens_compared"] > 0 and 0 <= g["logprob_gap_max"] <= g["logprob_gap_tolerance"]
    s = stages["sft"]["numbers"]
    assert 1 <= s["killed_after_checkpoint"] < s["steps"] == 8 and s["resumed_from"] == s["killed_after_checkpoint"]
    r = stages["rl"]["numbers"]
    assert r["steps"] == 3 and r["guidance_scale"] != 1.0 and r["ledger"]["mem/rollout_kv_bytes"] > 0
    assert "not_on_cpu" in r  # what the CPU cannot show is named, not skipped silently
    assert any(row.get("op") == "check" for row in stages["gen_bench"]["numbers"]["rows"])
    assert all(s["seconds"] > 0 for s in report["stages"])
    assert (tmp_path / "results.md").read_text().count("| ok |") >= 7
    assert (results.read_text() if results.exists() else None) == before  # check mode never appends


def test_gpu_smoke_build_step_fails_with_one_line(tmp_path, monkeypatch):
    """A failing build and a build without CUDA kernels are both failures with a reason (no GPU needed)."""
    import importlib.util

    from benchmarks import gpu_smoke

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else find_spec(n, *a))
    monkeypatch.setattr(gpu_smoke, "ROOT", tmp_path)
    (tmp_path / "setup.py").write_text("import sys\nprint('error: no compiler here')\nsys.exit(1)\n")
    res = gpu_smoke.build_extension(tmp_path, 60)
    assert res["status"] == "failed" and "no compiler here" in res["reason"]
    (tmp_path / "setup.py").write_text("print('built')\n")  # "builds", but the _C that imports has no CUDA kernels
    res = gpu_smoke.build_extension(tmp_path, 60)
    assert res["status"] == "failed" and "without CUDA" in res["reason"]
