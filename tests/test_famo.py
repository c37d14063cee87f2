"""FAMO: the combined gradient, the logit update (softmax VJP + Adam), balance across loss scales, state."""

from __future__ import annotations

import io
import math

import pytest
import torch

from mtft.balancers.base import TaskLosses
from mtft.balancers.famo import FAMO
from mtft.balancers.uniform import Uniform
from mtft.core.errors import MtftError

TASKS = ["a", "b", "c"]
ALL = [True, True, True]
NEXT = {"post_step_loss": "next_batch"}  # the cheaper variant, which updates from observe_step alone


def _observed(values: list[float], present: list[bool] | None = None) -> TaskLosses:
    return TaskLosses.from_values(values, present)


def _warm(famo: FAMO, steps: int = 4) -> FAMO:
    """Some updates so the logits and Adam moments are non-trivial."""
    g = torch.Generator().manual_seed(7)
    for t in range(1, steps + 1):
        values = (torch.rand(famo.num_tasks, generator=g) * 3 + 0.5).tolist()
        famo.combine(_observed(values))
        famo.observe_step(t, _observed(values))
    assert not torch.allclose(famo.weights(), torch.full((famo.num_tasks,), 1 / famo.num_tasks))
    return famo


def _literal_objective(famo: FAMO, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """FAMO's objective as written in the paper: sum_i z_i log(L_i - m_i + eps) / c over present tasks."""
    z = torch.softmax(famo.logits.detach()[present], 0)
    d = losses[present] - famo.min_losses[present] + famo.eps
    c = (z / d.detach()).sum()
    return (z * d.log()).sum() / c


def _softmax_vjp(logits: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Closed form of J_softmax(logits)^T delta."""
    z = torch.softmax(logits, 0)
    return z * (delta - (z * delta).sum())


def _adam_by_hand(
    x: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float, wd: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam (Kingma & Ba) with L2 weight decay added to the gradient, as torch.optim.Adam does it."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    g = grad + wd * x
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step = (lr / (1 - b1**t)) * m / ((v / (1 - b2**t)).sqrt() + eps)
    return x - step, m, v


@pytest.mark.parametrize("present", [ALL, [True, False, True]])
def test_combine_gradient_equals_literal_objective(present: list[bool]) -> None:
    famo = _warm(FAMO(TASKS, min_losses={"b": 0.3}, **NEXT))
    mask = torch.tensor(present)
    theta = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    scales = torch.tensor([1.0, 10.0, 100.0])

    def losses(th: torch.Tensor) -> torch.Tensor:
        return scales * (th**2).sum(1) + 0.5

    expected = torch.autograd.grad(_literal_objective(famo, losses(theta), mask), theta)[0]

    # one process: local == mean
    value = losses(theta)
    got = torch.autograd.grad(famo.combine(TaskLosses(value, value.detach(), mask)), theta)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)

    # two "ranks": the local shares sum to the global mean; summing their gradients gives the same
    share = torch.tensor([0.3, 0.8, 0.55])
    mean = losses(theta).detach()
    rank0 = famo.combine(TaskLosses(share * losses(theta), mean, mask))
    rank1 = famo.combine(TaskLosses((1 - share) * losses(theta), mean, mask))
    got = torch.autograd.grad(rank0 + rank1, theta)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    if not all(present):
        assert got[1].abs().max() == 0  # the absent task contributes nothing


def test_combine_coefficients_sum_to_one_and_favor_small_losses() -> None:
    famo = FAMO(["a", "b"])
    value = torch.tensor([1.0, 100.0], requires_grad=True)
    out = famo.combine(TaskLosses(value, value.detach(), torch.tensor([True, True])))
    (grad,) = torch.autograd.grad(out, value)
    # z = (1/2, 1/2), c = (1/1 + 1/100)/2 -> coefficients 1/(c*2*L_i) = (100/101, 1/101)
    torch.testing.assert_close(grad, torch.tensor([100 / 101, 1 / 101]))
    assert out.item() == pytest.approx(200 / 101, rel=1e-6)
    diag = famo.diagnostics()
    assert diag["famo/coef/a"] == pytest.approx(100 / 101) and diag["famo/logit/b"] == 0.0


def test_logit_update_is_softmax_vjp_with_adam() -> None:
    lr, gamma = 0.05, 0.01
    famo = FAMO(TASKS, lr=lr, gamma=gamma, min_losses={"a": 0.1, "c": 0.2}, eps=1e-6, **NEXT)
    m_floor = torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    prev = None
    for t in range(1, 6):
        values = (torch.rand(3, generator=g) * 2 + 0.5).tolist()
        famo.observe_step(t, _observed(values))
        cur = torch.tensor(values, dtype=torch.float64)
        if prev is not None:
            delta = (prev - m_floor + 1e-6).log() - (cur - m_floor + 1e-6).log()
            grad = _softmax_vjp(x, delta)
            # the closed form against central finite differences of <softmax(x), delta>
            h = 1e-6
            fd = torch.stack(
                [
                    (torch.softmax(x + h * e, 0) @ delta - torch.softmax(x - h * e, 0) @ delta) / (2 * h)
                    for e in torch.eye(3, dtype=torch.float64)
                ]
            )
            torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
            x, m, v = _adam_by_hand(x, grad, m, v, t - 1, lr, gamma)
        prev = cur
        torch.testing.assert_close(famo.logits.detach().double(), x, rtol=1e-5, atol=1e-6)
    assert x.abs().min() > 1e-3  # the check above compared real movement, not zeros
    torch.testing.assert_close(famo.weights().double(), torch.softmax(x, 0), rtol=1e-5, atol=1e-6)


def test_logits_move_toward_the_task_whose_log_loss_fell_less() -> None:
    famo = FAMO(["fast", "slow"], **NEXT)
    famo.observe_step(1, _observed([1.0, 50.0]))
    famo.observe_step(2, _observed([0.5, 49.0]))  # log-loss of "fast" fell by 0.69, "slow" by 0.02
    w = famo.weights()
    assert w[1] > w[0]
    # Adam's first step moves each logit by lr (the bias-corrected ratio is +-1)
    torch.testing.assert_close(famo.logits.detach(), torch.tensor([-0.025, 0.025]), atol=1e-6, rtol=0)


def _train(balancer: Uniform | FAMO, steps: int = 100, lr: float = 1e-3) -> torch.Tensor:
    """Two parameter vectors, quadratic losses scaled 1 and 100; returns each log-loss decrease."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, generator=g), torch.randn(5, generator=g) * 3
    theta = torch.zeros(2, 5, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr)

    def losses() -> torch.Tensor:
        return torch.stack([((theta[0] - a) ** 2).sum(), 100 * ((theta[1] - b) ** 2).sum()])

    start = losses().detach()
    both = torch.tensor([True, True])
    for t in range(1, steps + 1):
        value = losses()
        loss = balancer.combine(TaskLosses(value, value.detach(), both))
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = losses().detach() if balancer.recompute_after_step else value.detach()
        balancer.observe_step(t, TaskLosses(after, after, both))
    return start.log() - losses().detach().log()


@pytest.mark.parametrize("post_step_loss", ["next_batch", "recompute"])
def test_famo_balances_log_loss_decrease_across_scales(post_step_loss: str) -> None:
    uniform = _train(Uniform(["small", "large"]))
    famo_balancer = FAMO(["small", "large"], post_step_loss=post_step_loss)
    famo = _train(famo_balancer)
    assert (uniform > 0).all() and (famo > 0).all()
    uniform_ratio = abs(math.log(uniform[0].item() / uniform[1].item()))
    famo_ratio = abs(math.log(famo[0].item() / famo[1].item()))
    assert uniform_ratio > math.log(20)  # the plain sum: the x100 task's log-loss falls ~100x faster
    assert famo_ratio < math.log(2.5)
    assert famo_ratio < uniform_ratio / 4
    # the logits learned to favor the task that lags (the larger one starts farther from its optimum)
    assert famo_balancer.weights()[1] > 0.6


def test_absent_tasks_take_no_part() -> None:
    famo = FAMO(TASKS, **NEXT)
    pair = FAMO(["a", "c"], **NEXT)
    seq = [([2.0, 5.0, 1.0], ALL), ([1.5, 7.0, 0.9], [True, False, True]), ([1.4, 4.0, 0.5], ALL)]
    for t, (values, present) in enumerate(seq, start=1):
        famo.observe_step(t, _observed(values, present))
        pair.observe_step(t, _observed([values[0], values[2]]))
        if t == 2:
            # "b" was absent after step 2's update: only a and c moved, exactly as a two-task FAMO does
            torch.testing.assert_close(famo.logits.detach()[[0, 2]], pair.logits.detach(), rtol=0, atol=0)
            assert famo.logits.detach()[1] == 0
    state = famo.optimizer.state[famo.logits]
    assert state["exp_avg"][1] == 0 and state["exp_avg_sq"][1] == 0  # b was absent in both updates
    assert state["exp_avg"][0] != 0

    # combine renormalizes z over the present tasks: same coefficients as the two-task balancer
    value = torch.tensor([1.2, 3.0, 0.7], requires_grad=True)
    out = famo.combine(TaskLosses(value, value.detach(), torch.tensor([True, False, True])))
    (grad,) = torch.autograd.grad(out, value)
    pair_value = torch.tensor([1.2, 0.7], requires_grad=True)
    (pair_grad,) = torch.autograd.grad(
        pair.combine(TaskLosses(pair_value, pair_value.detach(), torch.tensor([True, True]))), pair_value
    )
    torch.testing.assert_close(grad[[0, 2]], pair_grad)
    assert grad[1] == 0


def test_absent_task_keeps_its_logit_and_adam_moments() -> None:
    famo = _warm(FAMO(TASKS, gamma=0.05, **NEXT))
    logits = famo.logits.detach().clone()
    state = {k: v.clone() for k, v in famo.optimizer.state[famo.logits].items()}
    assert logits[1] != 0 and state["exp_avg"][1] != 0
    famo.observe_step(5, _observed([1.0, 2.0, 3.0], [True, False, True]))  # "b" absent after this update
    mid = famo.logits.detach().clone()
    mid_state = {k: v.clone() for k, v in famo.optimizer.state[famo.logits].items()}
    famo.observe_step(6, _observed([0.7, 2.0, 3.1], [True, True, True]))  # "b" absent before this one
    new_state = famo.optimizer.state[famo.logits]
    assert famo.logits.detach()[1] == logits[1]
    assert (
        new_state["exp_avg"][1] == state["exp_avg"][1]
        and new_state["exp_avg_sq"][1] == state["exp_avg_sq"][1]
    )
    assert (famo.logits.detach()[[0, 2]] != mid[[0, 2]]).all()
    # a and c moved by the softmax VJP restricted to them, then Adam from their own moments
    delta = torch.tensor([math.log(1.0 / 0.7), math.log(3.0 / 3.1)], dtype=torch.float64)
    grad = _softmax_vjp(mid[[0, 2]].double(), delta)
    expected, _, _ = _adam_by_hand(
        mid[[0, 2]].double(),
        grad,
        mid_state["exp_avg"][[0, 2]].double(),
        mid_state["exp_avg_sq"][[0, 2]].double(),
        int(mid_state["step"]) + 1,
        famo.lr,
        famo.gamma,
    )
    torch.testing.assert_close(famo.logits.detach()[[0, 2]].double(), expected, rtol=1e-5, atol=1e-6)


def test_updates_need_two_tasks_present_in_both() -> None:
    famo = _warm(FAMO(TASKS, **NEXT))
    before = famo.state_dict()
    famo.observe_step(10, _observed([1.0, 2.0, 3.0], [True, False, False]))
    famo.observe_step(11, _observed([0.5, 2.0, 3.0], [True, True, False]))  # only "a" in both
    torch.testing.assert_close(famo.logits.detach(), before["logits"], rtol=0, atol=0)
    assert famo.optimizer.state[famo.logits]["step"] == before["optimizer"]["state"][0]["step"]
    # no task present at all: a zero loss that still backpropagates
    value = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    out = famo.combine(TaskLosses(value, value.detach(), torch.tensor([False, False, False])))
    assert out.item() == 0
    (grad,) = torch.autograd.grad(out, value)
    assert grad.abs().max() == 0


def test_recompute_compares_the_last_micro_batch_before_and_after() -> None:
    famo = FAMO(["a", "b"], post_step_loss="recompute")
    assert famo.recompute_after_step
    twin = FAMO(["a", "b"], post_step_loss="recompute")
    famo.combine(_observed([9.0, 1.0]))  # an earlier micro-batch of the same step
    famo.combine(_observed([2.0, 4.0]))
    famo.observe_step(1, _observed([1.0, 3.9]))
    twin.combine(_observed([2.0, 4.0]))
    twin.observe_step(1, _observed([1.0, 3.9]))
    torch.testing.assert_close(famo.logits.detach(), twin.logits.detach(), rtol=0, atol=0)
    assert famo.weights()[1] > famo.weights()[0]
    # without a combine since the last update there is nothing to compare against
    logits = famo.logits.detach().clone()
    famo.observe_step(2, _observed([0.5, 3.0]))
    torch.testing.assert_close(famo.logits.detach(), logits, rtol=0, atol=0)


def test_next_batch_first_step_only_stores() -> None:
    famo = FAMO(["a", "b"], **NEXT)
    assert not famo.recompute_after_step
    famo.combine(_observed([3.0, 1.0]))
    famo.observe_step(1, _observed([2.0, 4.0]))
    torch.testing.assert_close(famo.weights(), torch.tensor([0.5, 0.5]), rtol=0, atol=0)
    famo.observe_step(2, _observed([1.0, 3.9]))
    assert famo.weights()[1] > famo.weights()[0]


def _feed(famo: FAMO, step: int, g: torch.Generator) -> torch.Tensor:
    values = (torch.rand(famo.num_tasks, generator=g) * 2 + 0.5).tolist()
    present = (torch.rand(famo.num_tasks, generator=g) > 0.2).tolist()
    out = famo.combine(_observed(values, present))
    famo.observe_step(step, _observed([v * 0.9 for v in values], present))
    return out


@pytest.mark.parametrize("post_step_loss", ["next_batch", "recompute"])
def test_state_dict_round_trip_continues_bit_exactly(post_step_loss: str) -> None:
    kwargs = {"lr": 0.1, "gamma": 0.01, "min_losses": {"c": 0.1}, "post_step_loss": post_step_loss}
    straight = FAMO(TASKS, **kwargs)
    g = torch.Generator().manual_seed(11)
    for t in range(1, 8):
        _feed(straight, t, g)
    state = straight.state_dict()
    rng_state = g.get_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # what a checkpoint would do

    expected_weights, expected_out = [], []
    for t in range(8, 14):
        expected_out.append(_feed(straight, t, g))
        expected_weights.append(straight.weights())
    assert not torch.equal(expected_weights[0], expected_weights[-1])

    buffer.seek(0)
    for restored_state in (state, torch.load(buffer)):  # the in-memory snapshot was not mutated either
        restored = FAMO(TASKS, **kwargs)
        restored.load_state_dict(restored_state)
        g.set_state(rng_state)
        for i, t in enumerate(range(8, 14)):
            assert torch.equal(_feed(restored, t, g), expected_out[i])
            assert torch.equal(restored.weights(), expected_weights[i])
        assert torch.equal(restored.logits.detach(), straight.logits.detach())
        assert restored.diagnostics() == straight.diagnostics()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"lr": -0.1},
        {"lr": float("nan")},
        {"gamma": -1e-3},
        {"gamma": float("inf")},
        {"eps": 0.0},
        {"post_step_loss": "previous_batch"},
        {"min_losses": {"nope": 0.1}},
        {"min_losses": {"a": float("nan")}},
    ],
)
def test_bad_hyperparameters_raise(kwargs: dict) -> None:
    with pytest.raises(MtftError):
        FAMO(TASKS, **kwargs)


def test_loss_at_or_below_its_floor_is_an_error() -> None:
    famo = FAMO(TASKS, min_losses={"b": 1.0})
    with pytest.raises(MtftError, match="task b"):
        famo.combine(_observed([2.0, 0.5, 2.0]))
    famo.combine(_observed([2.0, 0.5, 2.0], [True, False, True]))  # an absent task's value is ignored
    with pytest.raises(MtftError, match="not finite"):
        famo.observe_step(1, _observed([2.0, float("nan"), 2.0]))


def test_hydra_config_builds_famo() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mtft.recipe.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir().resolve()), version_base=None):
        cfg = compose("train", overrides=["balancer=famo", "balancer.post_step_loss=recompute"])
    famo = instantiate(cfg.balancer, tasks=["a", "b"], _convert_="all")
    assert isinstance(famo, FAMO)
    assert (famo.lr, famo.gamma, famo.eps) == (0.025, 0.001, 1e-8)
    # the default is FAMO's own loop: the same batch re-evaluated after the update
    assert famo.recompute_after_step and famo.min_losses.tolist() == [0.0, 0.0]


class _ReferenceFamo:
    """FAMO as Cranial-XIX/FAMO's `famo.py` and its experiments run it, written out by hand."""

    def __init__(self, n: int, lr: float, gamma: float) -> None:
        self.w = torch.zeros(n, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.prev: torch.Tensor | None = None

    def weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev = losses.detach()
        z = torch.softmax(self.w.detach(), 0)
        d = losses + 1e-8
        return (d.log() * z / (z / d).sum().detach()).sum()

    def update(self, after: torch.Tensor) -> None:
        assert self.prev is not None
        delta = (self.prev + 1e-8).log() - (after + 1e-8).log()
        with torch.enable_grad():
            (d,) = torch.autograd.grad(torch.softmax(self.w, 0), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


def test_default_matches_the_reference_loop_on_the_same_batch() -> None:
    """Linear regression, three tasks of different scale, mini-batches: the trainer's path (combine,
    model step, the same batch re-evaluated, observe_step) against the reference loop, step by step."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g)
    targets = x @ torch.randn(6, 3, generator=g) * torch.tensor([1.0, 5.0, 30.0])

    def losses(theta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return ((x[rows] @ theta - targets[rows]) ** 2).mean(0)

    famo = FAMO(["a", "b", "c"], lr=0.05, gamma=0.01)
    reference = _ReferenceFamo(3, lr=0.05, gamma=0.01)
    ours, theirs = (torch.zeros(6, 3, requires_grad=True) for _ in range(2))
    opts = [torch.optim.SGD([p], lr=0.02) for p in (ours, theirs)]
    present = torch.ones(3, dtype=torch.bool)
    for t in range(1, 31):
        rows = torch.randint(64, (8,), generator=g)
        value = losses(ours, rows)
        opts[0].zero_grad()
        famo.combine(TaskLosses(value, value.detach(), present)).backward()
        opts[0].step()
        with torch.no_grad():
            after = losses(ours, rows)
        famo.observe_step(t, TaskLosses(after, after, present))

        opts[1].zero_grad()
        reference.weighted_loss(losses(theirs, rows)).backward()
        opts[1].step()
        with torch.no_grad():
            reference.update(losses(theirs, rows))

        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            famo.weights(), torch.softmax(reference.w.detach(), 0), rtol=1e-4, atol=1e-6
        )
    assert famo.weights().max() - famo.weights().min() > 0.05  # the weights really moved
