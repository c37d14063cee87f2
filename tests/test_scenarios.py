"""The embedded scenarios (conf/data/codetasks_*.yaml): they compose, build offline, and the skewed one
does what it is built for, a small task that overfits under uniform weights within its budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtft.data.mixture import build_mixture

from conftest import compose_train, read_metrics

# The batch bench/quality.py runs the scenarios at (its SCENARIO_BATCH), for 100 of its 150 steps: the
# small task's validation loss is lowest at step 40 and 3-4% above that from step 80 on.
SKEWED = ["data=codetasks_skewed", "trainer.batch_size=8", "trainer.eval_interval=20"]


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
    run_mtft("train", *SKEWED, "trainer.max_steps=100", "seed=2", "trainer.save_model=false",
             f"hydra.run.dir={run_dir}")  # fmt: skip
    val: dict[str, dict[int, float]] = {}
    for r in read_metrics(run_dir):
        if r["split"] == "val" and r["task"] != "all":
            val.setdefault(r["task"], {})[r["step"]] = r["loss"]
    small = val.pop("function_naming")
    best = min(small, key=small.__getitem__)
    assert best < 100 and max(v for s, v in small.items() if s > best) > 1.02 * small[best]
    for task, curve in val.items():
        assert curve[100] < 0.98 * curve[best], task
