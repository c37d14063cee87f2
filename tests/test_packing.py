"""Sequence packing: exact per-task losses, no attention across examples, a resumable packed stream,
and `mtft train data.packing=true` end to end (accumulation, workers, CoBa's probe, LoRA, resume)."""

import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from mtft.core.errors import MtftError
from mtft.data.batch import Batch
from mtft.data.batching import Batching
from mtft.data.collator import IGNORE_INDEX, TaskCollator
from mtft.data.config import DataConfig
from mtft.data.packing import PackedCollator, PackedRows, first_fit_decreasing
from mtft.data.sampler import BatchMode, MixtureSampler
from mtft.models.packing import check_packed_attention
from tests.test_loss import per_task_token_loss

from conftest import read_metrics, read_untimed_metrics, tiny_lm

VOCAB, PAD = 97, 0
ARCHITECTURES = ["llama", "qwen2"]


def tiny(arch: str, attention: str) -> torch.nn.Module:
    return tiny_lm(arch, VOCAB, attn_implementation=attention)


def examples() -> list[dict]:
    """Three tasks, lengths 3 to 29, prompts masked (as chat data is) or not (as plain text is)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (n, prompt) in enumerate([(12, 4), (29, 10), (3, 0), (17, 16), (8, 0), (22, 5), (5, 2), (14, 0)]):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "task_id": i % 3})
    return out


def task_sums(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    return per_task_token_loss(logits, batch, 3)


def test_first_fit_decreasing_fills_rows_and_keeps_every_item_once():
    lengths = torch.randint(1, 65, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert sum(lengths) / (64 * len(bins)) > 0.95  # far fuller than one example per row (~51%)
    assert bins == first_fit_decreasing(lengths, 64)
    assert first_fit_decreasing([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([9], 8)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_per_task_losses_equal_unpacked(arch):
    model, rows = tiny(arch, "sdpa"), examples()
    padded = TaskCollator(PAD)(rows)
    bins = first_fit_decreasing([len(r["input_ids"]) for r in rows], 40)
    assert len(bins) < len(rows)  # rows really hold several examples, of several tasks
    packed = PackedCollator(PAD, 40)([[rows[i] for i in b] for b in bins])
    assert packed.input_ids.shape[1] == 40 and "attention_mask" not in packed.model_inputs()
    assert int(packed.num_tokens()) == int(padded.num_tokens()) == sum(len(r["input_ids"]) for r in rows)
    assert padded.by_task() is not None and packed.by_task() is None  # packed rows hold several tasks
    sums, counts = task_sums(model, padded)
    packed_sums, packed_counts = task_sums(model, packed)
    assert torch.equal(counts, packed_counts) and counts.min() > 0
    torch.testing.assert_close(packed_sums / packed_counts, sums / counts, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_attention_across_packed_examples(arch, attention):
    """Changing one example of a row leaves every other example's logits as they were."""
    model, rows = tiny(arch, attention), examples()[:4]  # 12 + 29 + 3 + 17 = 61 tokens in one row
    collate = PackedCollator(PAD, 64)
    changed = [dict(r) for r in rows]
    changed[1] = {**rows[1], "input_ids": [(t + 1) % VOCAB for t in rows[1]["input_ids"]]}
    with torch.no_grad():
        before = model(**collate([rows]).model_inputs()).logits[0]
        after = model(**collate([changed]).model_inputs()).logits[0]
    spans = [(0, 12), (12, 41), (41, 44), (44, 61)]
    for k, (a, b) in enumerate(spans):
        if k == 1:
            assert not torch.allclose(before[a:b], after[a:b])
        else:
            torch.testing.assert_close(before[a:b], after[a:b], rtol=1e-5, atol=1e-6)
    check_packed_attention(model)  # what `mtft train data.packing=true` checks before training


def test_a_model_that_mixes_packed_examples_is_refused():
    model = tiny("llama", "sdpa")

    class Leaky(torch.nn.Module):  # ignores position ids: one causal sequence per row
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def get_input_embeddings(self) -> torch.nn.Module:
            return model.get_input_embeddings()

        def forward(self, input_ids, position_ids, use_cache):
            return model(input_ids=input_ids, use_cache=use_cache)

    with pytest.raises(MtftError, match="lets packed examples attend to each other"):
        check_packed_attention(Leaky())


class Rows:
    """A dataset of `rows` read as the DataLoader reads a Hugging Face dataset (`__getitems__`)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self.rows[i] for i in indices]


def test_packed_rows_fetch_whole_bins():
    rows = examples()
    fetched = PackedRows(Rows(rows)).__getitems__([[3, 1], [0], [7, 2, 5]])
    assert fetched == [[rows[3], rows[1]], [rows[0]], [rows[7], rows[2], rows[5]]]


@pytest.mark.parametrize("packing", [False, True])
def test_one_batching_object_decides_sampler_view_and_collator(packing):
    """`data.packing` is read once: the sampler's unit, the dataset view and the collator follow it,
    and the batches say what they hold without anyone looking at their keys."""
    rows = examples()
    lengths = [len(r["input_ids"]) for r in rows]
    batching = Batching(DataConfig(source="codetasks", packing=packing, max_length=40, packing_window=8), PAD)
    assert batching.packed == packing and batching.mode == (BatchMode.packed if packing else BatchMode.plain)
    sampler = batching.sampler([r["task_id"] for r in rows], 2, seed=0, rank=0, world_size=1, lengths=lengths)
    batch = next(batching.loader(Rows(rows), sampler))
    assert batch.input_ids.shape[0] == 2 and ("position_ids" in batch.model_inputs()) == packing
    assert (batch.by_task() is None) == packing
    if packing:  # two packed rows of the first window's bins: more than two examples' tokens
        assert int(batch.num_tokens()) > max(lengths) and batching.row_tokens(lengths) > sum(lengths) / 8
    else:
        assert int(batch.num_tokens()) == int(batch.attention_mask.sum())
        assert batching.row_tokens(lengths) == sum(lengths) / 8


def test_packed_stream_keeps_epochs_ranks_and_resumes_exactly():
    g = torch.Generator().manual_seed(0)
    task_ids = [0] * 300 + [1] * 120 + [2] * 57  # 477 examples
    lengths = torch.randint(4, 100, (len(task_ids),), generator=g).tolist()
    kw = dict(
        batch_size=3,
        seed=5,
        world_size=2,
        lengths=lengths,
        mode=BatchMode.packed,
        max_length=128,
        packing_window=50,
    )
    ranks = [iter(MixtureSampler(task_ids, rank=r, **kw)) for r in range(2)]
    steps = [[next(it) for _ in range(90)] for it in ranks]
    for batches in steps:
        assert all(len(b) == 3 and all(sum(lengths[i] for i in row) <= 128 for row in b) for b in batches)
    # the global stream (rank 0's rows then rank 1's, step by step) holds every example once per
    # epoch, in an order of windows: the first epoch's examples all come before the second's
    stream = [i for b0, b1 in zip(*steps, strict=True) for row in b0 + b1 for i in row]
    assert len(stream) > 2 * 477
    assert sorted(stream[:477]) == list(range(477))
    assert Counter(stream[477:954]) == Counter(range(477))
    # packed rows hold about two examples each: far fewer rows than examples
    assert len(stream) / (90 * 6) > 1.8
    # deterministic from the seed, resumable from the one counter, changed by another seed
    a = MixtureSampler(task_ids, rank=1, **kw)
    it = iter(a)
    first = [next(it) for _ in range(17)]
    state = a.state_dict()
    assert state == {"batches_done": 17} and first == steps[1][:17]
    b = MixtureSampler(task_ids, rank=1, **kw)
    b.load_state_dict(state)
    it_b = iter(b)
    assert [next(it_b) for _ in range(20)] == steps[1][17:37]
    other = iter(MixtureSampler(task_ids, rank=1, **{**kw, "seed": 6}))
    assert [next(other) for _ in range(17)] != first


def test_packing_options_are_checked():
    with pytest.raises(MtftError, match="data.packing and data.group_by_length are alternatives"):
        DataConfig(source="codetasks", packing=True, group_by_length=True)
    with pytest.raises(MtftError, match="data.num_workers must be >= 0"):
        DataConfig(source="codetasks", num_workers=-1)
    with pytest.raises(MtftError, match="data.packing needs the length of every example"):
        MixtureSampler([0, 1], batch_size=1, mode=BatchMode.packed)


PACKED = [
    "data.packing=true",
    "data.num_workers=2",
    "peft=lora",
    "balancer=coba",
    "balancer.warmup_steps=2",
    "balancer.history_length=3",
    "trainer.batch_size=2",
    "trainer.grad_accum=2",
    "trainer.max_steps=6",
    "trainer.save_interval=3",
    "trainer.eval_interval=3",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=8",
]


@pytest.mark.slow
def test_packed_training_resumes_bitwise(run_mtft, tmp_path):
    """CoBa (packed probe batches), LoRA, accumulation and DataLoader workers over packed rows: a run
    cut back to its step-3 checkpoint and resumed ends exactly where the uninterrupted run ended."""
    full = tmp_path / "full"
    proc = run_mtft("train", *PACKED, f"hydra.run.dir={full}")
    assert "= 4 packed rows, ~" in proc.stdout + proc.stderr  # the run-start block counts rows
    rows = read_metrics(full)
    train = {r["step"]: r for r in rows if r["split"] == "train" and r["task"] == "all"}
    assert sorted(train) == list(range(1, 7)) and all(r["loss"] is not None for r in train.values())
    # 2 x 2 packed rows of at most 256 tokens a step: more tokens than 4 unpacked examples hold
    assert min(r["tokens"] for r in train.values()) > 4 * 256 * 0.6
    assert {r["step"] for r in rows if r["split"] == "val"} == {0, 3, 6}

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("step-00000006", "model", "summary.json"))
    run_mtft("train", *PACKED, "trainer.resume=auto", f"hydra.run.dir={resumed}")
    assert read_untimed_metrics(resumed) == read_untimed_metrics(full)
    ours = load_file(resumed / "model" / "adapter_model.safetensors")
    theirs = load_file(full / "model" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
