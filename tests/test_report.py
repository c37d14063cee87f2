"""`mtft report`: aggregation checked on hand-made run dirs, then a real tiny sweep end to end."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from mtft.report.aggregate import build_report
from mtft.report.present import markdown_table

from conftest import CODETASKS

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(
    path: Path,
    balancer: str,
    seed: int,
    final: dict[str, float],
    best: dict[str, float] | None = None,
    step_seconds: float = 0.5,
    balancer_cfg: dict | None = None,
    max_steps: int = 2,
    weights: list[list[float]] | None = None,
) -> Path:
    """A run dir following the contract: .hydra/config.yaml, metrics.jsonl, summary.json."""
    tasks = list(final)
    best = best or final
    initial = dict.fromkeys(tasks, 4.0)
    (path / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "balancer": balancer_cfg or {"_target_": f"mtft.balancers.{balancer}.X"},
        "trainer": {"max_steps": max_steps},
    }
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 0, "split": "val", "task": t, "loss": initial[t]} for t in tasks]
    for step in range(1, max_steps + 1):
        # scale differs per balancer; report normalizes
        raw = (
            dict(zip(tasks, weights[step - 1], strict=True))
            if weights
            else {t: i + 1.0 for i, t in enumerate(tasks)}
        )
        rows += [{"step": step, "split": "train", "task": t, "loss": 1.0, "weight": raw[t]} for t in tasks]
        rows.append(
            {
                "step": step,
                "split": "train",
                "task": "all",
                "loss": 1.0,
                "tokens": 100,
                "tokens_per_s": 100 / step_seconds,
            }
        )
    rows += [{"step": max_steps, "split": "val", "task": t, "loss": final[t]} for t in tasks]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "balancer": balancer,
        "tasks": tasks,
        "steps": max_steps,
        "seed": seed,
        "initial_val_loss": initial,
        "final_val_loss": final,
        "best_val_loss": best,
        "train_tokens_per_s": 100 / step_seconds,
        "wall_s": 10.0,
        "peak_rss_mb": 1.0,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """uniform and coba, two seeds each, in job dirs 0..3 like a Hydra multirun."""
    root = tmp_path / "sweep"
    fake_run(root / "0", "uniform", 1, {"a": 2.0, "b": 3.0}, step_seconds=0.5)
    fake_run(root / "1", "uniform", 2, {"a": 2.2, "b": 3.2}, step_seconds=0.5)
    fake_run(root / "2", "coba", 1, {"a": 1.8, "b": 3.1}, best={"a": 1.7, "b": 3.0}, step_seconds=0.6)
    fake_run(root / "3", "coba", 2, {"a": 1.9, "b": 2.9}, best={"a": 1.9, "b": 2.8}, step_seconds=0.6)
    (root / "multirun.yaml").write_text("{}\n")
    return root


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """Markdown table -> {balancer: {column: cell}}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_table_aggregates_over_seeds(sweep):
    report = build_report([sweep])
    assert report.tasks == ["a", "b"] and [r.name for r in report.results] == ["uniform", "coba"]
    rows = parse_table(markdown_table(report))
    uniform, coba = rows["uniform"], rows["coba"]
    assert uniform["runs"] == "2" and uniform["a final"] == "2.100 ± 0.141"  # mean, sample std of 2.0, 2.2
    assert coba["a best"] == "1.800 ± 0.141" and coba["b final"] == "3.000 ± 0.141"
    assert uniform["mean final"] == "2.600 ± 0.141"  # runs' task means 2.5 and 2.7
    assert coba["mean final"] == "2.425 ± 0.035"  # 2.45 and 2.4
    assert coba["Δ vs uniform"] == f"{(2.425 / 2.6 - 1) * 100:+.1f}%"
    assert coba["Δ best vs uniform"] == f"{(statistics.fmean([2.35, 2.35]) / 2.6 - 1) * 100:+.1f}%"
    # final/initial: uniform seed 1 -> 0.5, 0.75 (spread 0.25); seed 2 -> 0.55, 0.8 (0.25)
    assert uniform["spread final/initial"] == "0.250 ± 0.000"
    # coba seed 1: a 1.8 > 1.7 * 1.01 and b 3.1 > 3.0 * 1.01 rose; seed 2: only b (2.9 > 2.8 * 1.01)
    assert coba["tasks rose"] == "1.5 ± 0.7" and uniform["tasks rose"] == "0.0 ± 0.0"
    assert uniform["steps/s (unpaired)"] == "2.00 ± 0.00" and coba["steps/s (unpaired)"] == "1.67 ± 0.00"
    assert coba["overhead vs uniform (unpaired)"] == "+20.0%"  # 0.6 s vs 0.5 s per step
    # rise = final / best - 1, mean over seeds: a (1.8/1.7 - 1 + 0) / 2; b (3.1/3.0 - 1 + 2.9/2.8 - 1) / 2
    assert coba["a rise"] == f"{(1.8 / 1.7 - 1) / 2 * 100:+.1f}%" and uniform["b rise"] == "+0.0%"
    assert coba["b rise"] == f"{(3.1 / 3.0 + 2.9 / 2.8 - 2) / 2 * 100:+.1f}%"


def test_winner_line_names_the_best_balancer_with_its_spread(sweep):
    from mtft.report.present import winners

    line = winners(build_report([sweep]))
    # overall: coba 2.425 ± 0.035 vs uniform 2.600 ± 0.141: 0.175 apart, more than either spread
    assert "overall (mean final): **coba** 2.425 ± 0.035, 0.175 ahead of uniform;" in line
    # a: coba 1.85 vs uniform 2.1 (spread 0.141): a win; b: coba 3.0 ± 0.141 vs uniform 3.1 ± 0.141: a tie
    assert "a: **coba** 1.850 ± 0.071, 0.250 ahead of uniform;" in line
    assert "b: **coba** 3.000 ± 0.141, 0.100 ahead of uniform (within the seed spread: a tie)." in line


def test_weight_shares_leave_out_the_warmup(tmp_path):
    from mtft.report.present import weights_table

    equal, moved = [0.5, 0.5], [[0.6, 0.4], [0.8, 0.2], [0.7, 0.3]]
    fake_run(tmp_path / "u", "uniform", 1, {"a": 2.0, "b": 3.0}, max_steps=4, weights=[[1.0, 1.0]] * 4)
    fake_run(tmp_path / "c", "coba", 1, {"a": 2.0, "b": 3.0}, max_steps=5, weights=[equal, equal, *moved])
    report = build_report([tmp_path / "u", tmp_path / "c"])
    coba = report.results[1]
    assert coba.weight_share["a"].mean == pytest.approx(0.7)  # steps 3-5 only
    assert coba.weight_sd["b"].mean == pytest.approx(statistics.pstdev([0.4, 0.2, 0.3]))
    rows = parse_table(weights_table(report))
    assert rows["uniform"]["a share ± sd"] == "fixed" and rows["coba"]["a share ± sd"] == "0.700 ± 0.082"


def test_val_curves_stay_readable_with_two_evaluations(sweep):
    from mtft.report.plots import val_curves_figure

    fig = val_curves_figure(build_report([sweep]))  # evaluations at steps 0 and 2 only
    low, high = fig.axes[0].get_ylim()
    assert low < 1.8 and high > 4.0  # both the step-0 loss and every final one are in view


def test_weights_are_normalized_per_step(sweep):
    from mtft.report.aggregate import val_curve, weight_curve

    report = build_report([sweep])
    steps, mean, _, _ = weight_curve(report.results[0], "b")
    assert steps == [1, 2] and mean == pytest.approx([2 / 3, 2 / 3])  # raw weights 1 and 2
    steps, mean, low, high = val_curve(report.results[0], "a")
    assert steps == [0, 2] and mean == pytest.approx([4.0, 2.1]) and (low[1], high[1]) == (2.0, 2.2)


def test_partial_and_broken_runs_are_reported_not_fatal(sweep, tmp_path):
    unfinished = sweep / "4"
    fake_run(unfinished, "famo", 1, {"a": 1.0, "b": 1.0})
    (unfinished / "summary.json").unlink()
    with (unfinished / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "split": "tra')  # torn write of a killed run
    torn = sweep / "0" / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 9, "spl')
    (sweep / "5" / ".hydra").mkdir(parents=True)  # a job that died before training
    (tmp_path / "empty").mkdir()

    report = build_report([sweep, tmp_path / "empty", tmp_path / "nope"])
    text = "\n".join(report.warnings)
    assert (
        f"{unfinished}: skipped, no summary.json (still running, killed or failed; metrics.jsonl stops at step 2 of 2)"
        in text
    )
    assert f"{unfinished / 'metrics.jsonl'}: its last line is truncated" in text
    assert f"{torn}: its last line is truncated" in text
    assert f"{sweep / '5'}: skipped, no summary.json" in text and "never started training" in text
    assert (
        f"{tmp_path / 'empty'}: no run dirs in it" in text and f"{tmp_path / 'nope'}: not a directory" in text
    )
    assert [(r.name, len(r.runs)) for r in report.results] == [("uniform", 2), ("coba", 2)]


def test_extra_keys_and_nulls_in_the_run_files_are_read_not_fatal(tmp_path):
    run = fake_run(tmp_path / "0", "uniform", 1, {"a": 2.0, "b": 3.0})
    summary = json.loads((run / "summary.json").read_text())
    summary["final_val_loss"]["b"] = None  # a diverged task: strict JSON wrote its NaN as null
    (run / "summary.json").write_text(json.dumps(summary | {"written_by": "another tool"}))
    entry = {"examples": 3, "loss": 1.0, "perplexity": 2.7, "metrics": {"exact_match": 40.0}, "score": 40.0}
    evaluation = {"model": "m", "tasks": {"a": entry | {"note": "extra"}}, "mean_score": 40.0, "extra": 1}
    (run / "eval.json").write_text(json.dumps(evaluation))
    fake_run(tmp_path / "1", "famo", 1, {"a": 2.0})
    summary = json.loads((tmp_path / "1" / "summary.json").read_text())
    (tmp_path / "1" / "summary.json").write_text(json.dumps({k: summary[k] for k in ("tasks", "seed")}))

    report = build_report([tmp_path])
    assert [(r.name, len(r.runs)) for r in report.results] == [("uniform", 1)]
    assert f"{tmp_path / '1' / 'summary.json'}: skipped, missing final_val_loss, best_val_loss, steps" in (
        report.warnings
    )
    rows = parse_table(markdown_table(report))["uniform"]
    assert (rows["a final"], rows["b final"], rows["mean final"]) == ("2.000", "–", "–")
    assert (rows["eval score"], rows["a exact_match"]) == ("40.0", "40.0")


def test_variants_of_one_balancer_get_their_own_rows(tmp_path):
    for i, tau in enumerate((1.0, 1.0, 5.0)):
        cfg = {"_target_": "mtft.balancers.coba.CoBa", "tau": tau}
        fake_run(tmp_path / str(i), "coba", i, {"a": 1.0 + i}, balancer_cfg=cfg)
    report = build_report([tmp_path])
    assert [(r.name, len(r.runs)) for r in report.results] == [("coba (tau=1.0)", 2), ("coba (tau=5.0)", 1)]
    assert any("no 'uniform' runs" in w for w in report.warnings)
    rows = parse_table(markdown_table(report))
    assert rows["coba (tau=5.0)"]["a final"] == "3.000" and rows["coba (tau=5.0)"]["Δ vs uniform"] == "–"


def test_settings_that_differ_besides_balancer_and_seed_are_flagged(tmp_path):
    fake_run(tmp_path / "0", "uniform", 1, {"a": 1.0}, max_steps=2)
    fake_run(tmp_path / "1", "famo", 1, {"a": 1.0}, max_steps=3)
    assert any(
        "differ in more than balancer and seed (trainer.max_steps)" in w
        for w in build_report([tmp_path]).warnings
    )


def test_report_cli_without_runs_fails_clearly(run_mtft, tmp_path):
    proc = run_mtft("report", str(tmp_path), check=False)
    assert proc.returncode == 1 and "no finished runs to compare" in proc.stderr
    assert "no run dirs in it" in proc.stderr


def test_sweep_recipe_composes(run_mtft):
    hydra_cfg = yaml.safe_load(run_mtft("train", "experiment=balancer_sweep", "--cfg", "hydra").stdout)
    assert hydra_cfg["hydra"]["sweeper"]["params"] == {
        "balancer": "uniform,coba_tiny,gradnorm,famo",
        "seed": "1,2",
    }
    job = yaml.safe_load(
        run_mtft(
            "train",
            "experiment=balancer_sweep",
            "balancer=coba_tiny",
            "--cfg",
            "job",
        ).stdout
    )
    assert job["balancer"]["_target_"] == "mtft.balancers.coba.CoBa"
    assert (job["balancer"]["warmup_steps"], job["balancer"]["history_length"]) == (25, 6)


# --- a real sweep (conftest's tiny_sweep), then the report ---------------------------------------


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel(tiny_sweep):
    sweep, proc = tiny_sweep
    summaries = [json.loads((sweep / job / "summary.json").read_text()) for job in ("0", "1", "2", "3")]
    expected = [(balancer, seed) for balancer in ("uniform", "famo") for seed in (1, 2)]
    assert [(s["balancer"], s["seed"]) for s in summaries] == expected
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    assert "JoblibLauncher" in (sweep / "multirun.yaml").read_text()


@pytest.mark.slow
def test_sweep_then_report(run_mtft, tiny_sweep):
    sweep = tiny_sweep[0]
    proc = run_mtft("report", str(sweep))
    rows = parse_table(proc.stdout)
    assert list(rows) == ["uniform", "famo"]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 4
    for name, row in rows.items():
        mine = [s for s in summaries if s["balancer"] == name]
        assert row["runs"] == "2" and sorted(s["seed"] for s in mine) == [1, 2]
        for task in CODETASKS:
            for kind in ("final", "best"):
                values = [s[f"{kind}_val_loss"][task] for s in mine]
                expected = f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"
                assert row[f"{task} {kind}"] == expected, (name, task, kind)
        means = [statistics.fmean(s["final_val_loss"].values()) for s in mine]
        assert row["mean final"] == f"{statistics.fmean(means):.3f} ± {statistics.stdev(means):.3f}"
        assert float(row["steps/s (unpaired)"].split(" ± ")[0]) > 0
    assert rows["uniform"]["Δ vs uniform"] in ("+0.0%", "-0.0%")

    out = sweep / "report"
    for name in ("val_curves.png", "weights.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    md = (out / "report.md").read_text()
    assert proc.stdout.strip() in md and "![validation curves](val_curves.png)" in md
    assert proc.stderr.strip().endswith("weights.png") and "warning" not in proc.stderr


@pytest.mark.slow
def test_truncated_run_dir_gives_a_clear_warning(run_mtft, tiny_sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(tiny_sweep[0], copy, ignore=shutil.ignore_patterns("report"))
    killed = copy / "1"
    (killed / "summary.json").unlink()
    metrics = killed / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[: len(metrics.read_text()) // 2])  # cut mid-line, as a kill does
    out = tmp_path / "out"
    proc = run_mtft("report", str(copy), "-o", str(out))
    assert (
        f"warning: {killed}: skipped, no summary.json (still running, killed or failed; metrics.jsonl stops at step"
        in proc.stderr
    )
    assert f"warning: {metrics}: its last line is truncated" in proc.stderr
    rows = parse_table(proc.stdout)
    assert rows["uniform"]["runs"] == "1" and rows["famo"]["runs"] == "2"
    assert (out / "report.md").exists() and (out / "weights.png").exists()
    assert "## Warnings" in (out / "report.md").read_text()
