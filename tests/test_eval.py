"""`mtft eval`, `mtft generate`, in-training samples and end-of-run eval, and the eval columns of the report."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtft.data.collator import IGNORE_INDEX
from mtft.data.config import TaskConfig, TrainOn
from mtft.data.encode import Encoder
from mtft.data.templates import CHATML, PLAIN
from mtft.eval.config import EvalConfig
from mtft.eval.generate import Prompt, generate
from mtft.eval.metrics import normalize, score

from conftest import CODETASKS, compose_train

METRIC = {
    "code_completion": "chrf",
    "docstring_to_code": "chrf",
    "code_to_docstring": "rouge_l",
    "function_naming": "exact_match",
}
# Few examples, short answers: the CLI paths are what is tested here, not the model.
QUICK = ["eval.max_samples=3", "eval.max_new_tokens=12"]
SHORT = [
    "trainer.max_steps=4",
    "trainer.eval_interval=2",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=8",
    "trainer.batch_size=8",
]


# --- metrics on fixed predictions, against values computed by hand -------------------------------


def test_exact_match_counts_equal_normalized_strings():
    value, each = score("exact_match", ["foo", "bar", "Baz"], ["foo", "baz", "baz"])
    assert each == [100.0, 0.0, 0.0] and value == pytest.approx(100 / 3)
    assert normalize("  Baz\n", strip=True, lowercase=True) == "baz"
    assert normalize("  Baz\n", strip=False) == "  Baz\n"


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = the cat on the mat: 5 words;
    # P = 5/6, R = 5/6, F1 = 5/6. Second pair: LCS "a" of 1 word; P = 1/2, R = 1/1, F1 = 2/3.
    value, each = score("rouge_l", ["the cat sat on the mat", "a b"], ["the cat is on the mat", "a"])
    assert each == pytest.approx([500 / 6, 200 / 3])
    assert value == pytest.approx((500 / 6 + 200 / 3) / 2)


def test_chrf_is_the_character_ngram_f_score():
    # sacrebleu's chrF: whitespace removed, character n-grams n=1..6, precision and recall averaged
    # over n, then F(beta=2). "abc def" vs "abc xyz" -> "abcdef" vs "abcxyz": matching n-grams
    # n=1: 3 of 6, n=2: 2 of 5 (ab, bc), n=3: 1 of 4 (abc), n=4..6: 0 of 3, 2, 1. P = R =
    # (1/2 + 2/5 + 1/4) / 6 = 0.191667, so F = 19.1667.
    value, each = score("chrf", ["abc def"], ["abc xyz"])
    assert value == pytest.approx(100 * (1 / 2 + 2 / 5 + 1 / 4) / 6) and each == pytest.approx([value])
    assert score("chrf", ["same text"], ["same text"])[0] == pytest.approx(100)


def test_bleu_of_an_exact_copy_is_100_and_of_a_disjoint_text_0():
    assert score("bleu", ["the quick brown fox jumps"], ["the quick brown fox jumps"])[0] == pytest.approx(
        100
    )
    assert score("bleu", ["one two three four"], ["five six seven eight"])[0] == 0


# --- prompts as in training; batched generation ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(run_mtft, tmp_path_factory):
    """A full finetune of the tiny model for a few steps, its model saved. Few enough that it still
    answers with text (20 steps answer everything with the end-of-text token at once), so that the
    generations compared below are not all empty."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run_mtft("train", *SHORT, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.mark.parametrize("template", [None, CHATML, PLAIN])
def test_the_prompt_is_exactly_the_training_tokens_before_the_answer(tiny_run, template):
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "model")
    encoder = Encoder(tokenizer, 512, template)
    roles, contents = ["user", "assistant"], ["def f(x):\n    return x", " f"]
    ids, labels, _ = encoder.encode_batch([(roles, contents)], TrainOn.last_assistant)[0]
    first_learned = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    prompt, end = encoder.prompt(roles, contents)
    assert prompt == ids[:first_learned]
    assert end == ("<|im_end|>\n" if template == CHATML else tokenizer.eos_token)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_run):
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "model")
    texts = ["def add(a, b):\n", "# name the function ___\ndef ___(x):\n    return x\n# name:", "class A:"]
    prompts = [Prompt([tokenizer.bos_token_id, *tokenizer(t)["input_ids"]], end="</s>") for t in texts]
    cfg = EvalConfig(max_new_tokens=10, batch_size=3)
    batched = generate(model, tokenizer, prompts, cfg)
    single = [generate(model, tokenizer, [p], cfg)[0] for p in prompts]
    assert batched == single and any(batched)
    # Sampling is seeded: the same seed gives the same answers, another seed other answers.
    hot = EvalConfig(max_new_tokens=10, batch_size=3, temperature=1.5, seed=3)
    assert generate(model, tokenizer, prompts, hot) == generate(model, tokenizer, prompts, hot)


# --- mtft eval ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(run_mtft, tiny_run):
    """`mtft eval` of the run into the run dir (the default), with QUICK's settings."""
    proc = run_mtft("eval", str(tiny_run), "--max-samples", "3", "eval.max_new_tokens=12")
    return json.loads((tiny_run / "eval.json").read_text()), proc


@pytest.mark.slow
def test_eval_writes_loss_perplexity_and_each_tasks_metric(tiny_run, evaluated):
    result, proc = evaluated
    assert list(result["tasks"]) == CODETASKS and result["max_samples"] == 3
    for task, entry in result["tasks"].items():
        assert entry["examples"] == 3
        assert entry["perplexity"] == pytest.approx(math.exp(entry["loss"]))
        assert list(entry["metrics"]) == [METRIC[task]] and entry["score"] == entry["metrics"][METRIC[task]]
        assert 0 <= entry["score"] <= 100
    samples = [json.loads(line) for line in (tiny_run / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["task"] for s in samples] == [t for t in CODETASKS for _ in range(3)]
    for s in samples:
        assert s["prompt"].startswith("<s>") and isinstance(s["prediction"], str)
        assert set(s["scores"]) == {METRIC[s["task"]]}
    # The task score is the metric over its examples (exact match: the mean of the per-example ones).
    naming = [s["scores"]["exact_match"] for s in samples if s["task"] == "function_naming"]
    assert result["tasks"]["function_naming"]["score"] == pytest.approx(sum(naming) / 3)
    assert "function_naming" in proc.stdout and "perplexity" in proc.stdout
    assert "eval.json" in proc.stderr


@pytest.mark.slow
def test_eval_loss_is_the_training_validation_loss_on_the_same_examples(run_mtft, tiny_run, tmp_path):
    """Training validated on the first eval_batches x eval_batch_size (8) examples per task: with
    --max-samples 8 the eval loss is the run's final validation loss."""
    run_mtft(
        "eval", str(tiny_run), "--max-samples", "8", "--task", "function_naming", "eval.max_new_tokens=1",
        "-o", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "eval.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert list(result["tasks"]) == ["function_naming"]
    loss = result["tasks"]["function_naming"]["loss"]
    assert loss == pytest.approx(summary["final_val_loss"]["function_naming"], rel=1e-5)


@pytest.mark.slow
def test_eval_errors_are_one_line_with_exit_code_2(run_mtft, tiny_run, tmp_path):
    (tmp_path / "unfinished" / ".hydra").mkdir(parents=True)
    (tmp_path / "unfinished" / ".hydra" / "config.yaml").write_text(
        (tiny_run / ".hydra" / "config.yaml").read_text()
    )
    cases = {
        ("eval", str(tmp_path / "unfinished")): "has no model to evaluate",
        ("eval", str(tmp_path / "nothing-here")): "not a run dir, a model dir or a Hub model id",
        ("eval", str(tiny_run), "--task", "translation"): "--task translation: not a task of this run",
        ("eval", str(tiny_run), "data.tasks.function_naming.metrics=[accuracy]"): (
            "data.tasks.function_naming.metrics must be one of [exact_match, rouge_l, chrf, bleu]"
        ),
        ("generate", str(tiny_run), "--prompt", "x", "--task", "translation"): "--task translation",
    }
    for args, message in cases.items():
        proc = run_mtft(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_unknown_metric_in_the_train_config_lists_the_options():
    with pytest.raises(Exception, match=r"metrics must be one of \[exact_match, rouge_l, chrf, bleu\]"):
        compose_train(["data.tasks.function_naming.metrics=[accuracy]"])
    assert compose_train([]).data.tasks["function_naming"].metrics == ["exact_match"]
    with pytest.raises(Exception, match=r"data.tasks.notes.metrics must be empty with format text"):
        TaskConfig(train=["x.jsonl"], format="text", metrics=["bleu"]).check("notes")


# --- mtft generate -----------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_answers_a_prompt_a_file_and_formats_a_task(run_mtft, tiny_run, tmp_path):
    one = run_mtft("generate", str(tiny_run), "--prompt", "def add(a, b):", "--max-new-tokens", "8")
    assert one.stdout.endswith("\n") and "error" not in one.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def ___(x):\\n    return x"}\n\n{"prompt": "class A:"}\n')
    proc = run_mtft(
        "generate", str(tiny_run), "--file", str(prompts), "--task", "function_naming",
        "--temperature", "0.7", "--seed", "1",
    )  # fmt: skip
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [a["prompt"] for a in answers] == ["def ___(x):\n    return x", "class A:"]
    assert all(isinstance(a["completion"], str) for a in answers)
    again = run_mtft(
        "generate", str(tiny_run), "--file", str(prompts), "--task", "function_naming",
        "--temperature", "0.7", "--seed", "1",
    )  # fmt: skip
    assert again.stdout == proc.stdout
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    bad = run_mtft("generate", str(tiny_run), "--file", str(prompts), check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f'error: {prompts}:2: expected an object with a "prompt" string, got {{"text": "no prompt key"}}'
    )


def test_task_frame_is_the_instruction_around_every_prompt():
    from datasets import Dataset

    from mtft.commands.generate import task_frame

    rows = Dataset.from_dict(
        {
            "roles": [["system", "user", "assistant"]] * 2,
            "contents": [
                ["Be brief.", "# name the function ___\ndef ___(a):\n    pass\n# name:", " f"],
                ["Be brief.", "# name the function ___\nasync def ___():\n    return 1\n# name:", " g"],
            ],
        }
    )
    assert task_frame(rows) == ("Be brief.", "# name the function ___\n", "\n# name:")


# --- LoRA: the adapter on its base gives what the merged export gives ---------------------------


@pytest.mark.slow
def test_lora_eval_equals_the_eval_of_its_merged_export(run_mtft, lora_run, tmp_path):
    run_dir, lora_eval = lora_run[0], tmp_path / "lora-eval"
    run_mtft("eval", str(run_dir), *QUICK, "-o", str(lora_eval))
    run_mtft("export", str(run_dir), "-o", str(tmp_path / "merged"))
    run_mtft("eval", str(tmp_path / "merged"), *QUICK, "-o", str(tmp_path / "merged-eval"))
    lora = [json.loads(line) for line in (lora_eval / "eval_samples.jsonl").read_text().splitlines()]
    merged = [
        json.loads(line)
        for line in (tmp_path / "merged-eval" / "eval_samples.jsonl").read_text().splitlines()
    ]
    assert len(lora) == 12 and [s["prediction"] for s in lora] == [s["prediction"] for s in merged]
    assert any(s["prediction"] for s in lora)  # the adapter answers with text: a comparison of something
    a = json.loads((lora_eval / "eval.json").read_text())["tasks"]
    b = json.loads((tmp_path / "merged-eval" / "eval.json").read_text())["tasks"]
    for task in CODETASKS:
        assert a[task]["loss"] == pytest.approx(b[task]["loss"], rel=1e-4)
        assert a[task]["metrics"] == pytest.approx(b[task]["metrics"])


# --- during and at the end of training; the report ----------------------------------------------


@pytest.fixture(scope="module")
def eval_sweep(tiny_sweep):
    """conftest's sweep: 4 steps, samples every 2, an eval of 3 examples a task at the end."""
    return tiny_sweep[0]


@pytest.mark.slow
def test_samples_during_training_go_to_samples_jsonl_and_tensorboard(eval_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = eval_sweep / "0"
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["task"]) for r in rows] == [(s, t) for s in (2, 4) for t in CODETASKS]
    assert all({"prompt", "reference", "prediction"} <= set(r) for r in rows)
    assert rows[0]["prompt"] == rows[4]["prompt"]  # the same fixed prompts each time
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert {f"samples/{t}/text_summary" for t in CODETASKS} <= set(events.Tags()["tensors"])
    assert "step 2 samples:" in (run / "train.log").read_text()


@pytest.mark.slow
def test_eval_at_end_records_the_metrics_in_summary_json(eval_sweep):
    for run in ("0", "1", "2", "3"):
        summary = json.loads((eval_sweep / run / "summary.json").read_text())
        on_disk = json.loads((eval_sweep / run / "eval.json").read_text())
        assert summary["eval"] == on_disk and list(on_disk["tasks"]) == CODETASKS
        assert all(on_disk["tasks"][t]["examples"] == 3 for t in CODETASKS)


@pytest.mark.slow
def test_report_of_a_sweep_with_eval_results_shows_the_metric_columns(run_mtft, eval_sweep, tmp_path):
    """Each balancer's row: the mean ± standard deviation over its two seeds' eval.json."""
    proc = run_mtft("report", str(eval_sweep), "-o", str(tmp_path))
    lines = proc.stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    columns = [f"{t} {METRIC[t]}" for t in CODETASKS]
    assert header[-5:] == ["eval score", *columns]
    evals: dict[str, list[dict]] = {}
    for job in ("0", "1", "2", "3"):
        balancer = json.loads((eval_sweep / job / "summary.json").read_text())["balancer"]
        evals.setdefault(balancer, []).append(json.loads((eval_sweep / job / "eval.json").read_text()))
    rows = lines[2 : 2 + len(evals)]  # the table's rows; other tables follow it
    assert all(row.startswith("|") for row in rows) and not lines[2 + len(evals)].strip()

    def spread(values: list[float]) -> str:
        return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"

    for line, (balancer, results) in zip(rows, evals.items(), strict=True):
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        assert cells["balancer"] == balancer and len(results) == 2
        assert cells["eval score"] == spread([r["mean_score"] for r in results])
        for task in CODETASKS:
            assert cells[f"{task} {METRIC[task]}"] == spread([r["tasks"][task]["score"] for r in results])
    assert "warning" not in proc.stderr


def test_sampling_and_eval_at_end_refuse_zero3():
    from mtft.core.errors import MtftError
    from mtft.recipe.validate import validate

    with pytest.raises(MtftError, match="ZeRO-3"):
        validate(compose_train(["deepspeed=zero3", "trainer.eval_at_end=true"]))
    with pytest.raises(MtftError, match="eval.top_p"):
        EvalConfig(top_p=0)


@pytest.mark.slow
def test_eval_on_two_processes_shards_and_gives_the_same_results(run_mtft, tiny_run, evaluated, tmp_path):
    """The same eval as `evaluated` (one process), on two."""
    run_mtft("eval", str(tiny_run), *QUICK, "distributed.nproc_per_node=2", "-o", str(tmp_path))
    one, two = evaluated[0], json.loads((tmp_path / "eval.json").read_text())
    for task in CODETASKS:
        assert one["tasks"][task]["loss"] == pytest.approx(two["tasks"][task]["loss"], rel=1e-5)
        assert one["tasks"][task]["metrics"] == two["tasks"][task]["metrics"]
    samples = [(d / "eval_samples.jsonl").read_text() for d in (tiny_run, tmp_path)]
    assert samples[0] == samples[1] and len(samples[0].splitlines()) == 12
    assert any(json.loads(line)["prediction"] for line in samples[0].splitlines())


@pytest.mark.slow
def test_a_trained_model_beats_the_untrained_one_on_two_tasks(run_mtft, tmp_path):
    """The acceptance check on the demo model, at a short run's budget (README has the 300-step numbers):
    200 steps at lr 4e-3 beat the untrained model on docstring_to_code (chrF ~4.1 vs ~2.2),
    code_to_docstring (ROUGE-L ~5.5 vs 0) and code_completion (chrF ~2.5 vs ~1.9) over the first 30
    validation examples per task. Shorter or smaller runs (60-150 steps at lr 4e-3 to 1e-2, or batches
    of 4 to 12 sequences) still answer everything with the end-of-text token, or win by a hair."""
    train = run_mtft(
        "train", "trainer.max_steps=200", "trainer.lr=4e-3", "trainer.eval_interval=200", "trainer.eval_batches=1",
        "trainer.save_interval=null", "trainer.save_model=false", "trainer.eval_at_end=true",
        "eval.max_samples=30", "logger.progress=false", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    base = re.search(r"model: \S+ \([\d.]+M parameters\) from (\S+)", train.stderr + train.stdout)
    assert base is not None
    run_mtft("eval", base.group(1), "--max-samples", "30", "-o", str(tmp_path / "untrained"))
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]["tasks"]
    untrained = json.loads((tmp_path / "untrained" / "eval.json").read_text())["tasks"]
    better = [t for t in CODETASKS if trained[t]["score"] > untrained[t]["score"]]
    assert len(better) >= 2, {t: (untrained[t]["score"], trained[t]["score"]) for t in CODETASKS}
    assert all(trained[t]["loss"] < untrained[t]["loss"] for t in CODETASKS)
