"""The C++ CPU decode loop as one thread team vs one independent group of rows per thread.

    python -m pytest benchmarks/test_bench_decode_team.py -q -s
    (knobs PGEN_BENCH_TEAM_BATCHES, default 1,2,4,8,32; PGEN_BENCH_ROUNDS, default 11)

One wave of the default "realistic" geometry of ``test_bench_generation.py`` (hidden 256,
MLP 1024, 1024 codes, 128-token prompts, CFG 5, plain sampling) is prefilled once through the
``Generator``; its ``_C.decode_loop_cpu`` call is captured and replayed with ``team=False``
and ``team=True`` alternately (so machine load drifting over the run hits both), for every
batch size. It prints the median and best decode time of each and the ratio; the team must
write the same codes as the groups (asserted). These numbers decide
``generation.decode_cpu.TEAM_MAX_ROWS``; the team only runs with more than one thread.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

import pgen_engine as pg
from pgen_engine.generation import Generator
from pgen_engine.models.tiny import make_tiny_checkpoint
from pgen_engine.ops._backend import extension

from benchmarks.test_bench_generation import GEOMETRIES, PROMPT_LEN, print_rows

BATCHES = tuple(int(b) for b in os.environ.get("PGEN_BENCH_TEAM_BATCHES", "1,2,4,8,32").split(","))
ROUNDS = int(os.environ.get("PGEN_BENCH_ROUNDS", "11"))
ROWS: list[dict] = []

pytestmark = pytest.mark.skipif(not hasattr(extension(), "decode_loop_cpu")
                                or not extension().packed_gemm_available(),
                                reason="needs pgen_engine._C with the packed AVX-512 GEMM")


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("bench_team") / "m", seed=0, **GEOMETRIES["realistic"])
    model = pg.load_model(path)
    return Generator(model, max_batch_size=max(BATCHES), max_seq_len=PROMPT_LEN + model.num_image_tokens)


def _captured_wave(gen: Generator, batch: int, monkeypatch) -> tuple[list, dict]:
    """The arguments of the decode_loop_cpu call of one generate over ``batch`` prompts."""
    ext = extension()
    real, calls = ext.decode_loop_cpu, []
    monkeypatch.setattr(ext, "decode_loop_cpu", lambda *a, **k: (calls.append((list(a), k)), real(*a, **k))[1])
    special = pg.SpecialTokens.builtin()
    ids = torch.randint(6, gen.model.config.text.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
    ids[:, 0], ids[:, -1] = special.bos, special.boi
    gen.generate(ids, seed=1, guidance_scale=5.0, temperature=1.0, top_k=0, top_p=1.0)
    monkeypatch.undo()
    assert len(calls) == 1, "one wave, one C++ decode call"
    return calls[0]


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_team_vs_groups(benchmark, gen, batch, monkeypatch):
    if torch.get_num_threads() < 2:
        pytest.skip("the team needs more than one thread")
    args, kw = _captured_wave(gen, batch, monkeypatch)
    real = extension().decode_loop_cpu
    out = args[0]
    times: dict[bool, list[float]] = {False: [], True: []}
    codes: dict[bool, torch.Tensor] = {}

    def call(team: bool) -> None:
        args[-1] = team  # the loop's last positional argument: team
        t = time.perf_counter()
        with torch.inference_mode():
            real(*args, **kw)
        times[team].append(time.perf_counter() - t)
        codes[team] = out.clone()

    def one_round():
        call(False)
        call(True)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert torch.equal(codes[False], codes[True]), "the team must write the groups' codes"
    row = dict(batch=batch, threads=torch.get_num_threads())
    for team, name in ((True, "team"), (False, "groups")):
        v = times[team][1:]  # the first pair is the warm-up
        row[f"{name}_median_ms"] = round(1e3 * statistics.median(v), 1)
        row[f"{name}_best_ms"] = round(1e3 * min(v), 1)
    row["median_ratio_team_over_groups"] = round(row["team_median_ms"] / row["groups_median_ms"], 3)
    benchmark.extra_info.update(row)
    ROWS.append(row)


def teardown_module(module):
    if not ROWS:
        return
    print_rows(ROWS)
    print(json.dumps({"bench": "decode_team", "rows": ROWS}))
