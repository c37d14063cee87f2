import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from mtft.core.errors import MtftError
from mtft.data import codetasks
from mtft.data.config import DataConfig, TaskConfig
from mtft.data.mixture import build_mixture
from mtft.data.sampler import BatchMode, MixtureSampler, sequence_lengths, task_probabilities


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# --- codetasks ---------------------------------------------------------------------------------


def test_codetasks_split_is_deterministic_and_disjoint():
    fns = list(codetasks.iter_functions())
    assert len(fns) > 5000  # the whole stdlib, not a sample
    split = {(f.module, f.qualname): codetasks.in_validation(f, 5, "salt") for f in fns}
    again = {(f.module, f.qualname): codetasks.in_validation(f, 5, "salt") for f in fns}
    assert split == again
    val = sum(split.values())
    assert 0.03 * len(split) < val < 0.07 * len(split)
    assert not any("/test" in f.module or f.module.startswith("test") for f in fns)
    # disjoint: no function text appears in both splits
    train_src = {f.source for f in fns if not split[(f.module, f.qualname)]}
    val_only = [f for f in fns if split[(f.module, f.qualname)] and f.source not in train_src]
    assert len(val_only) > 0.9 * val  # the rest are byte-identical functions defined in several modules


def test_codetasks_examples_for_one_function():
    src = 'def add(a, b):\n    """Add two numbers.\n\n    More detail.\n    """\n    c = a + b\n    return c'
    fn = codetasks.Function("m.py", "add", "add", src, "Add two numbers.\n\nMore detail.", (1, 5))
    ex = codetasks.examples_for(fn)
    assert set(ex) == set(codetasks.TASKS)
    assert ex["function_naming"]["response"] == " add" and "add" not in ex["function_naming"]["prompt"]
    assert ex["code_to_docstring"]["response"] == " Add two numbers."
    assert '"""' not in ex["code_to_docstring"]["prompt"]
    assert ex["docstring_to_code"]["response"] == "    c = a + b\n    return c\n"
    completion = ex["code_completion"]
    assert (completion["prompt"] + completion["response"]).endswith(src + "\n")
    assert ex["returns_value"] == {
        "prompt": f"# does the function return a value?\n{src}\n# answer:",
        "response": " yes",
    }


@pytest.mark.parametrize(
    "body, answer",
    [
        ("    return x + 1", " yes"),
        ("    return", " no"),
        ("    return None", " no"),
        ("    print(x)", " no"),
    ],
)
def test_returns_value_answers_whether_a_value_is_returned(body, answer):
    src = f"def f(x):\n    y = x\n{body}"
    fn = codetasks.Function("m.py", "f", "f", src, None, None)
    assert codetasks.examples_for(fn)["returns_value"]["response"] == answer


def test_codetasks_mixture_has_tasks_of_different_sizes(cache_dir):
    cfg = DataConfig(source="codetasks", tasks={t: TaskConfig() for t in codetasks.TASKS})
    mixture = build_mixture(cfg, cache_dir)
    sizes = {t: len(mixture.train[t]) for t in mixture.tasks}
    assert all(n > 1000 for n in sizes.values()) and len(set(sizes.values())) > 1
    assert all(len(mixture.validation[t]) > 50 for t in mixture.tasks)
    assert (cache_dir / "codetasks").is_dir()  # built once, cached


# --- files ------------------------------------------------------------------------------------


def files_task(tmp_path, **task) -> DataConfig:
    return DataConfig(source="files", tasks={"t": TaskConfig(**task)})


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(MtftError, match=r"data.tasks.t.train: no such file or directory: .*nope\.jsonl"):
        build_mixture(files_task(tmp_path, train=[str(tmp_path / "nope.jsonl")]), tmp_path)


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "", '{"prompt": "x", oops}']
    )
    with pytest.raises(MtftError, match=r"bad\.jsonl:3: malformed JSON"):
        build_mixture(files_task(tmp_path, train=[str(path)]), tmp_path)


def test_record_without_known_fields(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a"}])
    with pytest.raises(MtftError, match=r"odd\.jsonl:1: cannot tell the record's format .*question"):
        build_mixture(files_task(tmp_path, train=[str(path)]), tmp_path)


def test_prompt_response_and_text_records(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "response": "r"}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "t"}])
    mixture = build_mixture(
        files_task(tmp_path, train=[str(path), str(text)], validation=[str(path)]), tmp_path
    )
    rows = mixture.train["t"]
    assert [(r["roles"], r["contents"]) for r in rows] == [
        (["user", "assistant"], ["p", "r"]),
        (["text"], ["t"]),
    ]


def test_task_with_no_examples_is_an_error(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    cfg = DataConfig(source="files", tasks={"t": TaskConfig(train=[str(empty)], val_fraction=0.5)})
    with pytest.raises(MtftError, match=r"empty\.jsonl: no records"):
        build_mixture(cfg, tmp_path)


def test_empty_validation_set_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"x{i}"} for i in range(10)])
    cfg = DataConfig(source="files", tasks={"t": TaskConfig(train=[str(train)], val_fraction=0.001)})
    with pytest.raises(MtftError, match="task 't' has an empty validation set"):
        build_mixture(cfg, tmp_path)
    val = write_jsonl(tmp_path / "val.jsonl", [])
    cfg = DataConfig(source="files", tasks={"t": TaskConfig(train=[str(train)], validation=[str(val)])})
    with pytest.raises(MtftError, match=r"val\.jsonl: no records \(the file is empty\)"):
        build_mixture(cfg, tmp_path)


def test_val_fraction_holds_out_deterministically_and_caps_apply(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(400)]
    )
    cfg = DataConfig(
        source="files", tasks={"t": TaskConfig(train=[str(train)], val_fraction=0.25, max_train_samples=100)}
    )
    a, b = build_mixture(cfg, tmp_path), build_mixture(cfg, tmp_path)
    assert a.validation["t"]["key"] == b.validation["t"]["key"] and a.train["t"]["key"] == b.train["t"]["key"]
    assert len(a.train["t"]) == 100
    assert 60 < len(a.validation["t"]) < 140
    seen = {c[0] for c in a.train["t"]["contents"]}
    assert not seen & {c[0] for c in a.validation["t"]["contents"]}
    assert a.counts["t"].read == 400 and a.counts["t"].held_out == len(a.validation["t"])
    assert a.counts["t"].capped == 400 - 100 - len(a.validation["t"])


# --- sampler -----------------------------------------------------------------------------------


def test_proportional_epoch_sees_every_example_once_and_ranks_are_disjoint():
    task_ids = [0] * 30 + [1] * 10 + [2] * 8  # 48 examples
    per_rank = []
    for rank in range(2):
        sampler = MixtureSampler(task_ids, batch_size=4, seed=3, rank=rank, world_size=2)
        it = iter(sampler)
        per_rank.append([i for _ in range(6) for i in next(it)])  # 6 x 4 x 2 = one epoch
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(48))


def test_sampler_is_seeded_and_resumes_exactly():
    task_ids = [0] * 50 + [1] * 7
    for rule in ("proportional", "uniform", "temperature"):
        a = MixtureSampler(task_ids, batch_size=5, rule=rule, seed=1)
        it = iter(a)
        first = [next(it) for _ in range(13)]
        state = a.state_dict()
        rest = [next(it) for _ in range(20)]
        b = MixtureSampler(task_ids, batch_size=5, rule=rule, seed=1)
        b.load_state_dict(state)
        it_b = iter(b)
        assert [next(it_b) for _ in range(20)] == rest, rule
        c = MixtureSampler(task_ids, batch_size=5, rule=rule, seed=2)
        it_c = iter(c)
        assert [next(it_c) for _ in range(13)] != first, rule


def test_uniform_sampling_balances_tasks():
    task_ids = [0] * 900 + [1] * 100
    sampler = MixtureSampler(task_ids, batch_size=50, rule="uniform", seed=0)
    it = iter(sampler)
    counts = Counter(task_ids[i] for _ in range(40) for i in next(it))
    assert abs(counts[0] - counts[1]) < 0.1 * 2000
    prop = iter(MixtureSampler(task_ids, batch_size=50, rule="proportional", seed=0))
    counts = Counter(task_ids[i] for _ in range(20) for i in next(prop))
    assert counts[0] == 900 and counts[1] == 100  # exactly one epoch


def test_task_probabilities():
    assert task_probabilities([100, 25], "proportional").tolist() == [0.8, 0.2]
    assert task_probabilities([100, 25], "uniform").tolist() == [0.5, 0.5]
    p = task_probabilities([100, 25], "temperature", 2.0).tolist()
    assert abs(p[0] - 10 / 15) < 1e-9
    with pytest.raises(
        MtftError, match=r"data.sampling must be one of \[proportional, uniform, temperature\]"
    ):
        DataConfig(source="codetasks", sampling="random")


# --- length-grouped batching ----------------------------------------------------------------------


def _padding(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of padded positions when each batch is padded to its longest example."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_group_by_length_keeps_epochs_ranks_and_cuts_padding():
    g = torch.Generator().manual_seed(0)
    task_ids = [0] * 300 + [1] * 120 + [2] * 57  # 477 examples: epochs do not end on a batch boundary
    lengths = torch.randint(4, 200, (len(task_ids),), generator=g).tolist()
    kw = dict(batch_size=4, seed=5, world_size=2, lengths=lengths, group_batches=8)
    grouped = [iter(MixtureSampler(task_ids, rank=r, mode=BatchMode.grouped, **kw)) for r in range(2)]
    plain = [iter(MixtureSampler(task_ids, rank=r, **kw)) for r in range(2)]
    n_steps = 3 * len(task_ids) // 8 + 1  # three epochs and a bit
    g_batches = [[next(it) for _ in range(n_steps)] for it in grouped]
    p_batches = [[next(it) for _ in range(n_steps)] for it in plain]
    # the global stream (rank 0's slice then rank 1's slice, batch by batch) holds every example
    # once per epoch, exactly as without grouping
    stream = [i for b0, b1 in zip(*g_batches, strict=True) for i in b0 + b1]
    for epoch in range(3):
        assert sorted(stream[epoch * 477 : (epoch + 1) * 477]) == list(range(477))
    for step in range(n_steps):
        assert not set(g_batches[0][step]) & set(g_batches[1][step])  # ranks are disjoint
    # grouped batches pad far less than plain ones
    g_pad = _padding(g_batches[0] + g_batches[1], lengths)
    p_pad = _padding(p_batches[0] + p_batches[1], lengths)
    assert g_pad < 0.4 * p_pad, (g_pad, p_pad)
    # and the batch order inside a window is shuffled, not longest-first all the way down
    longest = [max(lengths[i] for i in b) for b in g_batches[0][:8]]
    assert longest != sorted(longest, reverse=True)


def test_group_by_length_is_seeded_and_resumes_exactly():
    task_ids = [0] * 90 + [1] * 41
    lengths = [(i * 37) % 101 + 1 for i in range(len(task_ids))]
    for rule in ("proportional", "uniform"):
        kw = dict(batch_size=5, rule=rule, lengths=lengths, mode=BatchMode.grouped, group_batches=4)
        a = MixtureSampler(task_ids, seed=1, **kw)
        it = iter(a)
        first = [next(it) for _ in range(17)]
        state = a.state_dict()
        assert state == {"batches_done": 17}  # still one counter
        rest = [next(it) for _ in range(30)]
        b = MixtureSampler(task_ids, seed=1, **kw)
        b.load_state_dict(state)
        it_b = iter(b)
        assert [next(it_b) for _ in range(30)] == rest, rule
        it_again = iter(MixtureSampler(task_ids, seed=1, **kw))
        assert [next(it_again) for _ in range(17)] == first, rule
        it_c = iter(MixtureSampler(task_ids, seed=2, **kw))
        assert [next(it_c) for _ in range(17)] != first, rule
        plain = iter(MixtureSampler(task_ids, seed=1, batch_size=5, rule=rule))
        assert [next(plain) for _ in range(17)] != first, rule  # the option does change the order


def test_group_by_length_needs_lengths_and_sequence_lengths_reads_arrow():
    with pytest.raises(MtftError, match="group_by_length needs the length"):
        MixtureSampler([0, 1], batch_size=1, mode=BatchMode.grouped)
    with pytest.raises(MtftError, match="got 1 lengths for 2 examples"):
        MixtureSampler([0, 1], batch_size=1, lengths=[3])
    rows = {"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [[1, 2, 3], [4], [5, 6]], "task_id": [0, 1, 0]}
    assert sequence_lengths(Dataset.from_dict(rows)) == [3, 1, 2]
    assert sequence_lengths([{"input_ids": [1, 2]}, {"input_ids": [3]}]) == [2, 1]


def test_group_by_length_is_in_the_data_schema():
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"group_by_length": True})
    assert cfg.group_by_length is True and cfg.group_batches == 50
    with pytest.raises(Exception, match="group_by_length"):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"group_by_length": "sometimes"})


def test_sampler_reads_a_dataset_column_like_a_list():
    task_ids = [0, 1, 1, 2, 0, 2, 2, 1, 0, 0] * 7
    ds = Dataset.from_dict({"task_id": task_ids}).select(range(69, -1, -1))  # an indices mapping too
    a = iter(MixtureSampler(ds["task_id"], batch_size=4, seed=3))
    b = iter(MixtureSampler(task_ids[::-1], batch_size=4, seed=3))
    assert [next(a) for _ in range(20)] == [next(b) for _ in range(20)]
