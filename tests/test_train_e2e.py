"""End-to-end runs of `mtft train` on the embedded default (tiny model, codetasks), as users run it."""

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CODETASKS, read_metrics

FAST = ["trainer.eval_batches=1", "trainer.eval_batch_size=32"]


@pytest.fixture(scope="module")
def default_run(run_mtft, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "default"
    proc = run_mtft(
        "train", "trainer.max_steps=20", "trainer.eval_interval=10", *FAST, f"hydra.run.dir={run_dir}"
    )
    return run_dir, proc


@pytest.mark.slow
def test_run_dir_follows_the_contract(default_run):
    run_dir, _ = default_run
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    for step in range(1, 21):
        by_task = {r["task"]: r for r in train if r["step"] == step}
        assert set(by_task) == {*CODETASKS, "all"}, step
        for task in CODETASKS:
            assert by_task[task]["weight"] == 1.0
            assert by_task[task]["loss"] is None or math.isfinite(by_task[task]["loss"])
        assert math.isfinite(by_task["all"]["loss"]) and by_task["all"]["tokens"] > 0
    assert sorted({r["step"] for r in val}) == [0, 10, 20]
    for step in (0, 10, 20):
        assert {r["task"] for r in val if r["step"] == step} == {*CODETASKS, "all"}

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["balancer"] == "uniform" and summary["tasks"] == CODETASKS and summary["steps"] == 20
    final = {r["task"]: r["loss"] for r in val if r["step"] == 20}
    for task in CODETASKS:
        assert summary["final_val_loss"][task] == pytest.approx(final[task])
        assert summary["best_val_loss"][task] <= summary["final_val_loss"][task]
    for key in ("train_tokens_per_s", "wall_s", "peak_rss_mb"):
        assert summary[key] > 0

    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 20 and config["balancer"]["_target_"].endswith("Uniform")


@pytest.mark.slow
def test_every_task_learns(default_run):
    summary = json.loads((default_run[0] / "summary.json").read_text())
    for task in CODETASKS:
        assert summary["final_val_loss"][task] < summary["initial_val_loss"][task], task


@pytest.mark.slow
def test_final_model_and_tokenizer_reload(default_run):
    model_dir = default_run[0] / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("def f(x):\n    return", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_console_reports_eval_lines_and_final_table(default_run):
    err = default_run[1].stderr
    assert "step 10  val  code_completion" in err
    assert "validation loss per task" in err and f"run dir: {default_run[0]}" in err


@pytest.mark.slow
def test_multirun_makes_one_job_dir_per_seed(run_mtft, tmp_path):
    sweep = tmp_path / "sweep"
    run_mtft(
        "train",
        "-m",
        "balancer=uniform",
        "seed=1,2",
        "trainer.max_steps=3",
        "trainer.eval_interval=3",
        "trainer.save_model=false",
        *FAST,
        f"hydra.sweep.dir={sweep}",
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert [s["seed"] for s in summaries] == [1, 2]
    first_losses = [
        [r["loss"] for r in read_metrics(job) if r["split"] == "train" and r["task"] == "all"] for job in jobs
    ]
    assert first_losses[0] != first_losses[1]  # different seeds, different batches


@pytest.mark.slow
def test_bf16_autocast_and_grad_accum(run_mtft, tmp_path):
    """grad_accum=2 x batch 4 consumes exactly the sequences of one batch of 8, under bf16 autocast."""
    steps = {}
    for name, batch, accum in (("accum", 4, 2), ("plain", 8, 1)):
        run_dir = tmp_path / name
        run_mtft(
            "train",
            "trainer.precision=bf16",
            f"trainer.grad_accum={accum}",
            f"trainer.batch_size={batch}",
            "trainer.max_steps=2",
            "trainer.eval_interval=2",
            "trainer.eval_batch_size=8",
            "trainer.eval_batches=1",
            "trainer.save_model=false",
            f"hydra.run.dir={run_dir}",
        )
        steps[name] = [r for r in read_metrics(run_dir) if r["split"] == "train" and r["task"] == "all"]
    assert [r["tokens"] for r in steps["accum"]] == [r["tokens"] for r in steps["plain"]]
    assert all(math.isfinite(r["loss"]) for rows in steps.values() for r in rows)
