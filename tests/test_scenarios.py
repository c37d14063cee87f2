"""The embedded scenarios (conf/data/codetasks_*.yaml): they compose, build offline, and the skewed one
does what it is built for, a small task that overfits under uniform weights within its budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.quality import SCENARIO_BATCH, SCENARIOS
from mtft.data.mixture import build_mixture

from conftest import compose_train, read_metrics

SKEWED = next(sc for sc in SCENARIOS if sc.data == "codetasks_skewed")


@pytest.mark.parametrize(
    "scenario, focus",
    [("codetasks_skewed", "function_naming"), ("codetasks_scaled", "returns_value")],
)
def test_scenarios_compose_and_build_offline(cache_dir: Path, scenario: str, focus: str) -> None:
    cfg = compose_train([f"data={scenario}"])
    assert cfg.data.source == "codetasks" and cfg.data.sampling == "uniform"
    mixture = build_mixture(cfg.data, cache_dir)
    assert focus in mixture.tasks
    sizes = {t: len(mixture.train[t]) for t in mixture.tasks}
    if scenario == "codetasks_skewed":  # one task small enough to be seen again every few steps
        assert sizes[focus] == cfg.data.tasks[focus].max_train_samples <= 32
        assert all(n > 1000 for t, n in sizes.items() if t != focus)
    else:  # a yes/no answer for every function: both answers well represented
        answers = {"".join(r["contents"][-1:]) for r in mixture.train[focus]}
        assert answers == {" yes", " no"}


@pytest.mark.slow
def test_skewed_small_task_overfits_under_uniform(run_mtft, tmp_path: Path) -> None:
    """Its validation loss bottoms out early and climbs well above that best within the budget,
    while every other task ends well below where it was at that point."""
    run_dir = tmp_path / "uniform"
    steps = SKEWED.steps  # the scenario as bench/quality.py runs it
    run_mtft("train", f"data={SKEWED.data}", f"trainer.batch_size={SCENARIO_BATCH}", *SKEWED.overrides,
             f"trainer.max_steps={steps}", "trainer.eval_interval=25", "seed=2", "trainer.save_model=false",
             f"hydra.run.dir={run_dir}")  # fmt: skip
    val: dict[str, dict[int, float]] = {}
    for r in read_metrics(run_dir):
        if r["split"] == "val" and r["task"] != "all":
            val.setdefault(r["task"], {})[r["step"]] = r["loss"]
    small = val.pop("function_naming")
    best = min(small, key=small.__getitem__)
    last_quarter = [v for s, v in small.items() if s >= 3 * steps // 4]
    assert best <= steps // 4 and sum(last_quarter) / len(last_quarter) > 1.05 * small[best]
    for task, curve in val.items():
        assert curve[steps] < 0.95 * curve[best], task
