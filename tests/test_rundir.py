"""The run-dir records: what `write` puts on disk reads back as the same record, strictly JSON,
with the extra keys the contract allows."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from mtft.core.jsonfile import dumps, read_json_object, write_json, write_jsonl
from mtft.core.rundir import EVAL, SUMMARY, EvalResult, EvalTask, Generation, MetricsRow, RunSetup, Summary


def _eval() -> EvalResult:
    return EvalResult(
        model="run",
        max_samples=3,
        generation=Generation(temperature=0.0, top_p=1.0, seed=0, max_new_tokens=12),
        tasks={
            "a": EvalTask(examples=3, loss=1.5, perplexity=4.48, metrics={"exact_match": 50.0}, score=50.0),
            "b": EvalTask(examples=3, loss=None, perplexity=None, metrics={}, score=None),
        },
        mean_loss=1.5,
        mean_score=50.0,
    )


def _summary() -> Summary:
    setup = RunSetup(
        parameters=10, trainable=10, trainable_dtype="float32", compute_dtype="float32",
        optimizer_state_dtype="float32", attention="sdpa", engine="single process", world_size=1,
        batch_size=2, grad_accum=1, global_batch=2, global_batch_tokens=64, global_batch_max_tokens=128,
        lr=1e-3, scheduler="cosine", warmup_steps=0, max_steps=4,
    )  # fmt: skip
    return Summary(
        balancer="uniform", tasks=["a", "b"], steps=4, seed=1, initial_val_loss={"a": 4.0, "b": 4.0},
        final_val_loss={"a": 2.0, "b": 3.0}, best_val_loss={"a": 2.0, "b": 2.5}, train_tokens_per_s=100.0,
        wall_s=10.0, peak_rss_mb=1.0, setup=setup, eval=_eval(),
    )  # fmt: skip


def test_summary_and_eval_read_back_as_written(tmp_path):
    summary = _summary()
    summary.write(tmp_path)
    assert Summary.from_dict(read_json_object(tmp_path / SUMMARY)) == summary
    assert summary.eval is not None
    summary.eval.write(tmp_path)
    assert EvalResult.read(tmp_path) == summary.eval
    on_disk = json.loads((tmp_path / EVAL).read_text())
    assert list(on_disk) == ["model", "max_samples", "generation", "tasks", "mean_loss", "mean_score"]
    assert list(on_disk["tasks"]["a"]) == ["examples", "loss", "perplexity", "metrics", "score"]
    assert json.loads((tmp_path / SUMMARY).read_text())["eval"] == on_disk


def test_readers_allow_extra_keys_and_missing_optional_ones():
    data = dataclasses.asdict(_summary()) | {"from_another_tool": [1, 2]}
    data["eval"]["tasks"]["a"]["extra"] = "kept out"
    assert Summary.from_dict(data) == _summary()
    minimal = Summary.from_dict({"tasks": ["a"], "steps": 2, "final_val_loss": {"a": 1}, "best_val_loss": {}})
    assert (minimal.balancer, minimal.seed, minimal.setup, minimal.eval) == ("", None, None, None)
    assert math.isnan(minimal.wall_s) and minimal.final_val_loss == {"a": 1.0}
    with pytest.raises(ValueError, match="missing final_val_loss, steps"):
        Summary.from_dict({"tasks": ["a"], "best_val_loss": {}})
    entry = EvalResult.from_dict({"tasks": {"a": {"metrics": {"bleu": None}}}}).tasks["a"]
    assert math.isnan(entry.metrics["bleu"]) and (entry.examples, entry.loss) == (0, None)


def test_a_non_finite_value_is_written_as_null_and_read_back_as_missing(tmp_path):
    summary = _summary()
    summary.final_val_loss["a"] = math.nan
    summary.wall_s = math.inf
    summary.write(tmp_path)
    text = (tmp_path / SUMMARY).read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = Summary.from_dict(json.loads(text))
    assert math.isnan(back.final_val_loss["a"]) and math.isnan(back.wall_s)
    assert dumps({"x": [math.nan, 1.0, {"y": -math.inf}]}) == '{"x": [null, 1.0, {"y": null}]}'


def test_files_are_replaced_whole(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")
    write_json(path, {"a": 1})
    write_jsonl(tmp_path / "x.jsonl", [{"t": "é"}, {"t": math.nan}], ensure_ascii=False)
    assert read_json_object(path) == {"a": 1}
    assert (tmp_path / "x.jsonl").read_text(encoding="utf-8") == '{"t": "é"}\n{"t": null}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.jsonl"]  # no temporary file left
    path.write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_json_object(path)


def test_metrics_row_keeps_its_keys_and_their_order():
    row = {
        "step": 3, "split": "train", "task": "all", "loss": None, "lr": 1e-3, "tokens": 64,
        "tokens_per_s": 12.5, "grad_norm": 0.5, "skipped": True, "coba/df": 0.1,
    }  # fmt: skip
    typed = MetricsRow.from_dict(row)
    assert (typed.tokens, typed.weight, typed.extra) == (64, None, {"skipped": True, "coba/df": 0.1})
    assert json.dumps(typed.to_dict()) == json.dumps(row)
    task_row = {"step": 3, "split": "train", "task": "a", "loss": 1.25, "weight": 0.5}
    assert json.dumps(MetricsRow.from_dict(task_row).to_dict()) == json.dumps(task_row)
    for bad in ({"step": "3", "split": "val", "task": "a"}, {"step": 3, "task": "a"}, [1]):
        with pytest.raises(ValueError, match="not a metrics row"):
            MetricsRow.from_dict(bad)
