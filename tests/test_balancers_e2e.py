"""Every balancer through the real CLI: a short tiny-model run logs a weight for every task at every step."""

import math

import pytest

from conftest import CODETASKS, read_metrics

SHORT = [
    "trainer.max_steps=8",
    "trainer.eval_interval=4",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=16",
    "trainer.batch_size=8",
    "trainer.save_model=false",
]


def test_the_documented_coba_command_composes(run_mtft):
    out = run_mtft("train", "balancer=coba", "data=codetasks", "--cfg", "job").stdout
    assert "_target_: mtft.balancers.coba.CoBa" in out and "probe: stratified" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "balancer, extra",
    [
        ("coba", ["balancer.warmup_steps=3", "balancer.history_length=3", "balancer.update_interval=1"]),
        ("famo", []),
        ("famo", ["balancer.post_step_loss=next_batch"]),
        ("gradnorm", []),
    ],
    ids=["coba", "famo", "famo-next-batch", "gradnorm"],
)
def test_balancer_run_logs_every_tasks_weight(run_mtft, tmp_path, balancer, extra):
    run_dir = tmp_path / balancer
    run_mtft("train", f"balancer={balancer}", *extra, *SHORT, f"hydra.run.dir={run_dir}")
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    weights = {}
    for step in range(1, 9):
        rows = {r["task"]: r for r in train if r["step"] == step}
        assert set(rows) == {*CODETASKS, "all"}
        weights[step] = [rows[t]["weight"] for t in CODETASKS]
        assert all(math.isfinite(w) and w > 0 for w in weights[step])
    # an adaptive balancer moves its weights away from where they started
    assert weights[8] != weights[1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["balancer=coba", "balancer.history_length=1"], "balancer.history_length must be an integer >= 2"),
        (["balancer=coba", "balancer.tau=0"], "balancer.tau must be a finite number > 0"),
        (["balancer=famo", "balancer.post_step_loss=later"], "expected one of [recompute, next_batch]"),
        (
            ["balancer=gradnorm", "balancer.shared_params=no_such_layer"],
            "'no_such_layer' matches no trainable",
        ),
    ],
    ids=["coba-history", "coba-tau", "famo-mode", "gradnorm-pattern"],
)
def test_bad_balancer_settings_fail_before_training(run_mtft, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = run_mtft("train", *overrides, *SHORT, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()  # nothing half-written that would block a rerun
