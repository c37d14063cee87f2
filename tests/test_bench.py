"""Smoke test of the benchmark scripts (bench/): a couple of steps of every part, no timing asserted.

Speed is measured only by `make bench`; here we check that the scripts run, that every loop of the
throughput comparison trains on the same batches, and that BENCHMARKS.md blocks are rewritten in place.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))  # `bench` is a top-level folder of the checkout, not part of the wheel

from bench import overhead, run, throughput  # noqa: E402
from bench.common import Setup, Timing  # noqa: E402


@pytest.fixture(scope="module")
def setup(cache_dir: Path) -> Setup:
    return Setup.load([f"cache_dir={cache_dir}"])


def test_timing_excludes_warmup_steps():
    t = Timing(stamps=[1.0, 2.0, 4.0, 7.0], tokens=[10, 20, 30, 40], warmup=1)
    assert t.seconds == 6.0 and t.measured_tokens == 90  # steps 2-4: 20 + 30 + 40 tokens in 7 - 1 s
    assert t.step_times == [1.0, 2.0, 3.0] and t.tokens_per_s == 15.0


def test_overhead_counts_a_periodic_probe_step_at_its_share():
    coba = [[1.0] * 7 + [3.0], [2.0] * 7 + [6.0]]  # one probe step in eight, twice the work
    uniform = [[1.0] * 8, [2.0] * 8]
    assert overhead._summarize(coba, uniform)["ratio"] == pytest.approx(10 / 8)  # a median would say 1.0


def test_split_tasks_relabels_every_example(setup: Setup):
    old_train = np.asarray(setup.data.train["task_id"])
    for T in (2, 8):
        data = overhead.split_tasks(setup.data, T)
        new = np.asarray(data.train["task_id"])
        assert len(data.tasks) == T and set(new.tolist()) == set(range(T))
        assert (new // 2 == old_train).all() if T == 8 else (new == old_train % 2).all()
        assert sorted(r for rows in data.val_rows for r in rows) == list(range(len(data.validation)))
    with pytest.raises(ValueError):
        overhead.split_tasks(setup.data, 6)


META = {"started": "now", "wall_s": 1.0, "load_avg": [[0, 0, 0], [0, 0, 0]]}


def _results(mode: str, **parts: dict) -> dict:
    """A results.json record of `mode` holding `parts`, as bench.run writes it."""
    machine = {"cpu": "cpu", "cores": 2, "memory_gb": 1, "platform": "p", "python": "3", "torch": "t"}
    machine |= {"torch_threads": 2, "omp_num_threads": None, "transformers": "x", "load_avg": [0, 0, 0]}
    header = {"model_parameters": 1e6, "train_examples": 10, "batch_size": 16}
    return {"mode": mode, "machine": machine, **header, **parts}


def test_throughput_and_overhead_run_and_render(setup: Setup, tmp_path: Path):
    tp = throughput.run(setup, reps=1, steps=2, warmup=1, log=lambda s: None)
    assert set(tp["sides"]) == set(throughput.SIDES)
    assert all(math.isfinite(v) and v > 0 for v in tp["ratios"].values())
    # the same batches on every loop (run() checks it token by token), and grouping really cuts padding
    assert tp["padding"]["grouped"]["waste"] < 0.5 * tp["padding"]["plain"]["waste"]
    assert tp["padding"]["packed"]["waste"] < 0.1 * tp["padding"]["plain"]["waste"]
    assert tp["padding"]["batches"] > 0

    oh = overhead.run(setup, (4,), reps=1, steps=9, warmup=1, log=lambda s: None)
    by = oh["by_tasks"]["4"]
    assert set(by) == set(overhead.BALANCERS) and by["uniform"]["ratio"] == 1.0
    assert all(by[b]["median_step_s"] > 0 for b in overhead.BALANCERS)
    with pytest.raises(ValueError, match="multiple of CoBa's update_interval"):
        overhead.run(setup, (4,), reps=1, steps=2, warmup=1)
    oh["lean"] = overhead.run_lean(setup, reps=1, batches=1)
    assert all(math.isfinite(v) and v > 0 for k, v in oh["lean"].items() if "/" in k)

    results = _results("smoke", throughput={**tp, **META}, overhead={**oh, **META})
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(
        "# Benchmarks\n\nprose kept\n\n<!-- bench:throughput -->\nold table\n<!-- /bench:throughput -->\n\nmore prose\n"
    )
    run.rewrite(md, run.render(results))
    text = md.read_text()
    assert "old table" not in text and "prose kept" in text and "more prose" in text
    assert "| mtft |" in text and "padding waste" in text and "| 4 |" in text and "Lean LM head" in text
    assert "| mtft, data.packing=true |" in text and "≥ 1.8x plain batches" in text
    assert text.count("<!-- bench:throughput -->") == 1 and "<!-- bench:targets -->" in text
    run.rewrite(md, run.render(results))
    assert md.read_text() == text  # idempotent: a second run replaces the same blocks
    assert "| throughput | now | 0.0 |" in text and "| overhead | now |" in text


def test_only_reruns_the_named_part_and_keeps_the_others(setup: Setup, tmp_path: Path):
    kept = {"overhead": {"by_tasks": {}, "started": "earlier"}, "throughput": {"stale": True}}
    results = run.run_all("smoke", tmp_path, ["throughput"], kept, log=lambda s: None, setup=setup)
    assert results["overhead"] == {"by_tasks": {}, "started": "earlier"}
    assert "stale" not in results["throughput"] and results["throughput"]["ratios"]
    assert results["throughput"]["wall_s"] > 0 and len(results["throughput"]["load_avg"]) == 2
    assert run.enabled(run.MODES["smoke"]) == ("throughput", "overhead")
    assert run.enabled(run.MODES["full"]) == run.PARTS


def test_packed_quality_is_judged_against_the_noise_of_both_sides():
    gap, noise = run.packed_vs_plain([6.00, 6.02, 6.04], [6.01, 6.03, 6.05])
    assert math.isclose(gap, 0.01) and math.isclose(noise, 2 * (2 * 0.0004 / 3) ** 0.5)


def test_data_pipeline_benchmark_runs_and_renders(setup: Setup):
    from bench import data

    results = data.run(300, setup.model_path, (1,), log=lambda s: None)
    assert results["python"]["rows"] == 300 and results["mtft_1"]["rows"] == 300
    assert results["mtft_1"]["tokens"] > 300 * 20 and results["mtft_1"]["hwm_mb"] > 0
    table = data.render(results)
    assert "300 generated conversations" in table and "`data.num_proc=1`" in table


def test_generation_benchmark_runs_and_renders(setup: Setup):
    from bench import generation

    g = generation.run(setup, n=4, max_new_tokens=3, batch_size=4, reps=1, log=lambda s: None)
    assert g["prompts"] == 4 and g["ratio"] > 0 and g["tokens_per_s"]["single"] > 0
    assert "| batched (4 prompts" in generation.render(g)


def test_a_partial_run_keeps_the_blocks_it_lacks_and_judges_the_skewed_scenario():
    def stats(rise: float, mean: float) -> dict:
        return {"rise": rise, "mean_final": mean, "weight_sd": 0.05, "n": 3}

    skewed = {"stats": {"uniform": stats(0.04, 5.2), "coba": stats(0.015, 5.19)}, "report_md": "", "dir": "d"}
    skewed |= {"steps": 400, "overrides": ["trainer.scheduler=constant_with_warmup"]}
    scenarios = {"seeds": [1, 2, 3], "by_data": {"codetasks_skewed": {**skewed, "wall_s": 60}}}
    blocks = run.render(_results("full", scenarios={**scenarios, **META}))
    assert not {"throughput", "overhead", "quality", "data", "generation"} & set(blocks)  # kept as they are
    assert (
        "| scenarios | now |" in blocks["run"]
        and "Budget: 400 steps x 8 sequences per run with `trainer.scheduler=constant_with_warmup`, seeds 1, 2, 3"
        in blocks["scenarios"]
    )
    row = blocks["targets"].splitlines()[-1]
    assert "`data=codetasks_skewed`" in row and "+1.5% vs +4.0%" in row and row.endswith("| met |")
    skewed["stats"]["coba"] = stats(0.025, 5.19)  # more than half of uniform's rise
    assert run.render_targets(_results("full", scenarios=scenarios)).endswith("| **missed** |")
    assert run.render(_results("smoke"))["quality"] == "(not run in this mode)"


def test_the_committed_results_are_strict_json_and_benchmarks_md_shows_them():
    """BENCHMARKS.md's tables are what `--render-only` makes of the committed full run, so neither is
    edited without the other."""
    path = ROOT / "bench" / "results" / "full" / "results.json"
    results = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    for name, body in run.render(results).items():
        assert f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->" in text, name
