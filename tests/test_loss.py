import torch
import torch.nn.functional as F

from mtft.balancers import TaskLosses
from mtft.balancers.uniform import Uniform
from mtft.data.batch import Batch
from mtft.data.collator import IGNORE_INDEX, TaskCollator
from mtft.engine.loss import scored_positions, scored_token_loss


def per_task_token_loss(
    logits: torch.Tensor, batch: Batch, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scored_token_loss` from a full forward's `(batch, length, vocab)` logits."""
    scored = scored_positions(batch.labels)
    return scored_token_loss(logits[scored], batch.labels, batch.token_task_ids(), scored, num_tasks)


def naive_per_task_loss(logits, labels, task_ids, num_tasks):
    """Reference: loop over samples and tokens, the obviously-correct way."""
    sums = [0.0] * num_tasks
    counts = [0] * num_tasks
    for b in range(logits.size(0)):
        for t in range(logits.size(1) - 1):
            target = labels[b, t + 1].item()
            if target == IGNORE_INDEX:
                continue
            sums[task_ids[b]] += F.cross_entropy(logits[b, t][None], torch.tensor([target])).item()
            counts[task_ids[b]] += 1
    return torch.tensor(sums), torch.tensor(counts, dtype=torch.float32)


def random_batch(seed: int = 0, batch: int = 9, length: int = 13, vocab: int = 37, num_tasks: int = 4):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        n = int(torch.randint(3, length + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        p = int(torch.randint(1, n - 1, (1,), generator=g))
        rows.append(
            {
                "input_ids": ids,
                "labels": [IGNORE_INDEX] * p + ids[p:],
                "task_id": i % (num_tasks - 1),  # the last task is absent on purpose
            }
        )
    collated = TaskCollator(pad_token_id=0)(rows)
    logits = torch.randn(batch, collated.input_ids.size(1), vocab, generator=g)
    return logits, collated


def test_per_task_loss_matches_naive_reference():
    logits, batch = random_batch()
    sums, counts = per_task_token_loss(logits, batch, 4)
    ref_sums, ref_counts = naive_per_task_loss(logits, batch.labels, batch.task_ids, 4)
    torch.testing.assert_close(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-5)
    assert counts[3] == 0 and sums[3] == 0  # absent task contributes nothing


def test_per_task_loss_ignores_prompt_and_padding_logits():
    logits, batch = random_batch(seed=1)
    sums, _ = per_task_token_loss(logits, batch, 4)
    # Scramble every logit that predicts a masked position: the loss must not change.
    masked = batch.labels[:, 1:] == IGNORE_INDEX
    scrambled = logits.clone()
    scrambled[:, :-1][masked] = torch.randn_like(scrambled[:, :-1][masked]) * 50
    sums2, _ = per_task_token_loss(scrambled, batch, 4)
    torch.testing.assert_close(sums, sums2)


def test_collator_masks_prompt_and_padding_and_carries_task_ids():
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "task_id": 1},
        {"input_ids": [9, 10], "labels": [-100, 10], "task_id": 0},
    ]
    batch = TaskCollator(pad_token_id=0)(rows)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.task_ids.tolist() == [1, 0]


def test_uniform_combine_is_weighted_mean_over_present_tasks():
    losses = TaskLosses.from_values([1.0, 2.0, 4.0], present=[True, True, False])
    assert Uniform(["a", "b", "c"]).combine(losses).item() == 1.5
    weighted = Uniform(["a", "b", "c"], weights={"b": 3.0})
    assert weighted.weights().tolist() == [1.0, 3.0, 1.0]
    assert abs(weighted.combine(losses).item() - (1.0 + 6.0) / 4.0) < 1e-6
