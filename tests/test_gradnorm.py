"""GradNorm: gradient norms on W pulled toward G_bar * r_i^alpha, weights summing to T, W selection, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtft.balancers.base import TaskLosses
from mtft.balancers.gradnorm import GradNorm
from mtft.core.errors import MtftError

TASKS = ["small", "large"]


@pytest.fixture(autouse=True)
def one_thread():
    """The toy nets are tiny: extra threads only contend with other work on the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TrunkNet(nn.Module):
    """A shared trunk named like a HF decoder (`model.layers.<i>`) plus one head per task."""

    def __init__(self, tasks: int = 2, d_in: int = 16, d: int = 32) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Linear(d_in, d), nn.Linear(d, d)])
        self.heads = nn.ModuleList([nn.Linear(d, 4) for _ in range(tasks)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x
        for layer in self.model.layers:
            h = torch.tanh(layer(h))
        return [head(h) for head in self.heads]


def toy_data(n: int = 64, sigmas: tuple[float, ...] = (1.0, 30.0), seed: int = 0):
    """The paper's toy: y_i = sigma_i tanh((B + eps_i) x), so loss scales differ by ~sigma_i^2."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 4, generator=g)
    xs = torch.randn(n, 16, generator=g)
    ys = [s * torch.tanh(xs @ (base + 0.5 * torch.randn(16, 4, generator=g))) for s in sigmas]
    return xs, ys


def task_losses(net: nn.Module, xs: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([((out - y) ** 2).mean() for out, y in zip(net(xs), ys, strict=True)])


def everyone(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def train(
    net: nn.Module,
    bal: GradNorm,
    opt: torch.optim.Optimizer,
    steps: range,
    data=None,
    present=None,
) -> list[dict]:
    """The trainer's call order: combine -> backward -> optimizer.step -> observe_step."""
    xs, ys = data or toy_data()
    out = []
    for step in steps:
        local = task_losses(net, xs, ys)
        mask = everyone(len(ys)) if present is None else present(step)
        loss = bal.combine(TaskLosses(local=local, mean=local.detach(), present=mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bal.observe_step(step, TaskLosses(local.detach(), local.detach(), mask))
        out.append({"weights": bal.weights(), **bal.diagnostics()})
    return out


def gaps(row: dict) -> tuple[float, float]:
    """(sum_i |G_i - target_i| / sum_i G_i, log(G_1/G_2) - log(target_1/target_2)) of one update."""
    g = [row[f"gradnorm/G/{t}"] for t in TASKS]
    target = [row[f"gradnorm/target/{t}"] for t in TASKS]
    return row["gradnorm/grad_loss"] / sum(g), math.log(g[0] / g[1]) - math.log(target[0] / target[1])


def run_toy(lr: float, steps: int = 100) -> list[dict]:
    torch.manual_seed(0)
    net = TrunkNet()
    bal = GradNorm(TASKS, alpha=1.5, lr=lr)
    bal.setup(net)
    return train(net, bal, torch.optim.Adam(net.parameters(), lr=1e-3), range(1, steps + 1))


def test_gradient_norms_move_to_their_targets_and_weights_sum_to_t():
    history = run_toy(lr=0.025)
    loss_0, gap_0 = gaps(history[0])
    loss_end, gap_end = gaps(history[-1])
    # The large-scale task starts with a ~30x larger gradient than its target ratio allows.
    assert gap_0 < -3
    assert loss_end < 0.25 * loss_0
    assert abs(gap_end) < 0.3 * abs(gap_0)
    for row in history:
        assert row["weights"].sum().item() == pytest.approx(2.0, abs=1e-5)
        assert (row["weights"] > 0).all()
    # The large-loss task is down-weighted: its gradient dominated the shared layer.
    assert history[-1]["weights"][1] < 0.3 < 1.7 < history[-1]["weights"][0]

    # Control: with weights effectively frozen the gap stays (so the assertions above can fail).
    frozen = run_toy(lr=1e-12)
    assert abs(gaps(frozen[-1])[1]) > 0.8 * abs(gap_0)
    assert gaps(frozen[-1])[0] > 2 * loss_end


def raw_norms(net: TrunkNet, xs: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    """||grad_W L_i|| on the last trunk layer, measured independently of the balancer."""
    local = task_losses(net, xs, ys)
    trunk = list(net.model.layers[1].parameters())
    return torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(local[i], trunk, retain_graph=True)]).norm()
            for i in range(len(ys))
        ]
    )


def test_one_update_follows_the_formulas():
    """G_i = w_i ||grad_W L_i||, target_i = G_bar r_i^alpha, and Adam's first step is -lr * sign."""
    torch.manual_seed(0)
    net = TrunkNet()
    xs, ys = toy_data(sigmas=(1.0, 5.0))
    alpha, lr = 1.5, 0.025
    bal = GradNorm(TASKS, alpha=alpha, lr=lr)
    bal.setup(net)
    norms = raw_norms(net, xs, ys)
    fed = [[2.0, 3.0], [1.0, 3.0]]  # L(0), then task 0 halved: L/L0 = (0.5, 1), r = (2/3, 4/3)
    for step, values in enumerate(fed, start=1):
        w = bal.weights()
        local = task_losses(net, xs, ys)
        bal.combine(TaskLosses(local=local, mean=local.detach(), present=everyone(2)))
        bal.observe_step(step, TaskLosses.from_values(values))
    d = bal.diagnostics()
    r = torch.tensor([2 / 3, 4 / 3])
    G = w * norms
    target = G.mean() * r**alpha
    for i, task in enumerate(TASKS):
        assert d[f"gradnorm/r/{task}"] == pytest.approx(r[i].item())
        assert d[f"gradnorm/G/{task}"] == pytest.approx(G[i].item(), rel=1e-5)
        assert d[f"gradnorm/target/{task}"] == pytest.approx(target[i].item(), rel=1e-5)
    assert d["gradnorm/grad_loss"] == pytest.approx((G - target).abs().sum().item(), rel=1e-5)
    # Step 1 (r = 1): G_small < G_bar < G_large, so Adam's first step raises w_small and lowers w_large.
    first = torch.tensor([1 + lr, 1 - lr])
    assert torch.allclose(w, first * 2 / first.sum(), atol=1e-6)

    # A plain reference: one weight vector, the gradient loss with a constant target, Adam, renormalize.
    ref = torch.ones(2, requires_grad=True)
    adam = torch.optim.Adam([ref], lr=lr)
    for values in fed:
        ratio = torch.tensor(values) / torch.tensor(fed[0])
        G = ref * norms
        target = (G.mean() * (ratio / ratio.mean()) ** alpha).detach()
        adam.zero_grad()
        (G - target).abs().sum().backward()
        adam.step()
        with torch.no_grad():
            ref *= 2 / ref.sum()
    assert torch.allclose(bal.weights(), ref.detach(), atol=1e-6)


def settle(alpha: float, observed) -> tuple[GradNorm, float]:
    """600 weight updates on a frozen model and a fixed batch, with the task losses `observed(step)`
    reported after each step: the balancer, and G_small / G_large of the model's real gradients."""
    torch.manual_seed(0)
    net = TrunkNet()
    xs, ys = toy_data(sigmas=(1.0, 5.0))
    bal = GradNorm(TASKS, alpha=alpha, lr=0.01)
    bal.setup(net)
    for step in range(1, 601):
        local = task_losses(net, xs, ys)
        bal.combine(TaskLosses(local=local, mean=local.detach(), present=everyone(2)))
        bal.observe_step(step, TaskLosses.from_values(observed(step)))
    G = bal.weights() * raw_norms(net, xs, ys)
    return bal, (G[0] / G[1]).item()


def test_fixed_point_is_g_bar_times_r():
    """Frozen model, fixed batch, alpha=1: w_i ||grad L_i|| settles where G_1/G_2 = r_1/r_2.

    With alpha=1 the targets sum to sum_i G_i, so the fixed point is exactly reachable (for other
    alpha the additive Adam steps and the renormalization to sum T pull against each other).
    """
    bal, ratio = settle(1.0, lambda step: [2.0, 3.0] if step == 1 else [1.0, 3.0])
    d = bal.diagnostics()
    assert d["gradnorm/G/small"] / d["gradnorm/G/large"] == pytest.approx(0.5, rel=0.03)
    assert ratio == pytest.approx(0.5, rel=0.03)


def test_alpha_zero_equalizes_gradient_norms():
    bal, _ = settle(0.0, lambda step: [1.0 / step, 3.0])  # r differs; alpha=0 ignores it
    d = bal.diagnostics()
    assert d["gradnorm/G/small"] == pytest.approx(d["gradnorm/G/large"], rel=0.03)


def test_default_w_is_the_last_block_and_a_regex_selects_what_it_says():
    net = TrunkNet()
    bal = GradNorm(TASKS)
    bal.setup(net)
    assert bal.shared_names == ["model.layers.1.weight", "model.layers.1.bias"]

    custom = GradNorm(TASKS, shared_params=r"model\.layers\.0\.weight")
    custom.setup(net)
    assert custom.shared_names == ["model.layers.0.weight"]
    heads = GradNorm(TASKS, shared_params=r"^heads\.")
    heads.setup(net)
    assert heads.shared_names == [n for n, _ in net.named_parameters() if n.startswith("heads.")]


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        ("transformer.h", "transformer.h.2."),
        ("gpt_neox.layers", "gpt_neox.layers.2."),
        ("blocks", "blocks.2."),
    ],
)
def test_default_finder_handles_gpt_style_names(stack, expected):
    root = nn.Module()
    node = root
    parts = stack.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    root.add_module("lm_head", nn.Linear(4, 8))
    bal = GradNorm(TASKS)
    bal.setup(root)
    assert bal.shared_names == [expected + "weight", expected + "bias"]


def test_only_trainable_parameters_count():
    net = TrunkNet()
    net.model.layers[1].requires_grad_(False)  # e.g. a frozen top block
    bal = GradNorm(TASKS)
    bal.setup(net)
    assert bal.shared_names == ["model.layers.0.weight", "model.layers.0.bias"]


def test_non_matching_regex_and_blockless_model_raise():
    with pytest.raises(MtftError, match=r"nothing\\\.here"):
        GradNorm(TASKS, shared_params=r"nothing\.here").setup(TrunkNet())
    with pytest.raises(MtftError, match="shared_params"):
        GradNorm(TASKS).setup(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))


@pytest.mark.parametrize(
    "kwargs", [{"alpha": -0.1}, {"alpha": math.nan}, {"lr": 0.0}, {"lr": -1.0}, {"shared_params": "("}]
)
def test_invalid_hyperparameters_raise(kwargs):
    with pytest.raises(MtftError):
        GradNorm(TASKS, **kwargs)


def test_combine_needs_setup_and_a_graph():
    bal = GradNorm(TASKS)
    with pytest.raises(MtftError, match="setup"):
        bal.combine(TaskLosses.from_values([1.0, 2.0]))
    bal.setup(TrunkNet())
    with pytest.raises(MtftError, match="differentiable"):
        bal.combine(TaskLosses.from_values([1.0, 2.0]))


def test_absent_task_gets_no_update_and_l0_from_its_first_present_step():
    torch.manual_seed(0)
    tasks = ["a", "b", "c"]
    net = TrunkNet(tasks=3)
    data = toy_data(sigmas=(1.0, 10.0, 3.0))
    bal = GradNorm(tasks)
    bal.setup(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def present(step: int) -> torch.Tensor:
        return torch.tensor([True, True, step >= 4])

    steps = {}
    xs, ys = data
    for step in range(1, 7):
        local = task_losses(net, xs, ys)
        mask = present(step)
        loss = bal.combine(TaskLosses(local=local, mean=local.detach(), present=mask))
        w = bal.weights()
        expected = (w[:2] * local[:2]).sum() / w[:2].sum() if step < 4 else (w * local).sum() / w.sum()
        assert loss.item() == pytest.approx(expected.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        bal.observe_step(step, TaskLosses(local.detach(), local.detach(), mask))
        steps[step] = (local.detach().clone(), bal.state_dict(), bal.diagnostics())
        assert bal.weights().sum().item() == pytest.approx(3.0, abs=1e-5)

    l0 = steps[6][1]["initial_losses"]
    assert l0[0] == steps[1][0][0] and l0[1] == steps[1][0][1]
    assert l0[2] == steps[4][0][2]  # first step where "c" was present, not step 1
    assert math.isnan(steps[3][1]["initial_losses"][2])
    # While absent, "c" has no Adam state and no diagnostics; afterwards it is updated like the others.
    for step in (1, 2, 3):
        assert 2 not in steps[step][1]["optimizer"]["state"]
        assert "gradnorm/G/c" not in steps[step][2] and "gradnorm/G/a" in steps[step][2]
    assert steps[6][1]["optimizer"]["state"][2]["step"].item() == 3
    assert steps[6][1]["optimizer"]["state"][0]["step"].item() == 6


def test_a_single_present_task_makes_no_update():
    net = TrunkNet()
    bal = GradNorm(TASKS)
    bal.setup(net)
    xs, ys = toy_data()
    mask = torch.tensor([True, False])
    local = task_losses(net, xs, ys)
    bal.combine(TaskLosses(local=local, mean=local.detach(), present=mask))
    bal.observe_step(1, TaskLosses(local.detach(), local.detach(), mask))
    assert torch.equal(bal.weights(), torch.ones(2)) and bal.diagnostics() == {}


def test_gradient_accumulation_uses_the_mean_gradient_of_the_step():
    """Two micro-batches give the same G_i and weights as one combine on their averaged loss."""
    torch.manual_seed(0)
    net = TrunkNet()
    xs, ys = toy_data(n=64)
    halves = [(xs[:32], [y[:32] for y in ys]), (xs[32:], [y[32:] for y in ys])]
    accumulated, single = GradNorm(TASKS), GradNorm(TASKS)
    accumulated.setup(net)
    single.setup(net)
    for step in range(1, 4):
        parts = [task_losses(net, x, y) for x, y in halves]
        for part in parts:
            accumulated.combine(TaskLosses(local=part, mean=part.detach(), present=everyone(2)))
        whole = (parts[0] + parts[1]) / 2
        single.combine(TaskLosses(local=whole, mean=whole.detach(), present=everyone(2)))
        for bal in (accumulated, single):
            bal.observe_step(step, TaskLosses.from_values(whole.tolist()))
        a, s = accumulated.diagnostics(), single.diagnostics()
        for task in TASKS:
            assert a[f"gradnorm/G/{task}"] == pytest.approx(s[f"gradnorm/G/{task}"], rel=1e-5)
        assert torch.allclose(accumulated.weights(), single.weights(), atol=1e-6)
    assert not torch.equal(single.weights(), torch.ones(2))


def test_state_dict_round_trip_continues_bit_identically():
    torch.manual_seed(0)
    net = TrunkNet()
    bal = GradNorm(TASKS)
    bal.setup(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    train(net, bal, opt, range(1, 11))
    saved_net, saved_opt, saved_bal = copy.deepcopy(net), copy.deepcopy(opt.state_dict()), bal.state_dict()

    straight = train(net, bal, opt, range(11, 21))  # keeps going after the snapshot was taken

    net2 = saved_net
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-3)
    opt2.load_state_dict(saved_opt)
    bal2 = GradNorm(TASKS)
    bal2.setup(net2)
    bal2.load_state_dict(saved_bal)
    resumed = train(net2, bal2, opt2, range(11, 21))
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a["weights"], b["weights"])
        assert {k: v for k, v in a.items() if k != "weights"} == {
            k: v for k, v in b.items() if k != "weights"
        }
    assert not torch.equal(straight[-1]["weights"], saved_bal["weights"])


def test_state_dict_rejects_other_tasks():
    with pytest.raises(MtftError, match="tasks"):
        GradNorm(["x", "y"]).load_state_dict(GradNorm(TASKS).state_dict())


def _distributed_worker(rank: int, init_file: str, steps: int, queue) -> None:
    """One of two ranks: each holds half the batch; `local` sums over ranks to the global mean."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TrunkNet()
    xs, ys = toy_data(n=64)
    bal = GradNorm(TASKS)
    bal.setup(net)
    part = slice(rank * 32, rank * 32 + 32)
    for step in range(1, steps + 1):
        outs = net(xs[part])
        local = torch.stack([((o - y[part]) ** 2).sum() / (64 * 4) for o, y in zip(outs, ys, strict=True)])
        mean = local.detach().clone()
        dist.all_reduce(mean)
        bal.combine(TaskLosses(local=local, mean=mean, present=everyone(2)))
        bal.observe_step(step, TaskLosses(mean, mean, everyone(2)))
    queue.put((rank, bal.weights().tolist(), bal.diagnostics()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_agree_with_one_process(tmp_path):
    steps = 4
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _distributed_worker, args=(str(tmp_path / "init"), steps, queue), nprocs=2, start_method="spawn"
    )
    got = [queue.get() for _ in range(2)]
    results = {rank: torch.tensor(w) for rank, w, _ in got}
    diags = {rank: d for rank, _, d in got}
    assert torch.equal(results[0], results[1]) and diags[0] == diags[1]

    torch.manual_seed(0)
    net = TrunkNet()
    xs, ys = toy_data(n=64)
    bal = GradNorm(TASKS)
    bal.setup(net)
    for step in range(1, steps + 1):
        local = task_losses(net, xs, ys)
        bal.combine(TaskLosses(local=local, mean=local.detach(), present=everyone(2)))
        bal.observe_step(step, TaskLosses.from_values(local.tolist()))
    assert torch.allclose(results[0], bal.weights(), atol=1e-5)
    # G_i is the norm of the global gradient (summed over ranks), not of one rank's share.
    assert diags[0].keys() == bal.diagnostics().keys()
    for key, value in bal.diagnostics().items():
        assert diags[0][key] == pytest.approx(value, rel=1e-4), key
    assert not torch.equal(bal.weights(), torch.ones(2))


def test_per_task_row_forwards_give_the_whole_batch_gradient_norms():
    """`per_task_rows`: each task's gradient on W taken over its own rows (its own forward) equals the
    whole-batch one, since task i's loss does not depend on other rows; so do the loss and the model
    gradient of the combined loss. Only the cost differs."""
    from mtft.engine.forward import task_token_loss, task_token_loss_by_task
    from tests.test_forward import TASKS as T
    from tests.test_forward import VOCAB, tiny
    from tests.test_loss import random_batch

    _, batch = random_batch(seed=5, vocab=VOCAB)
    model = tiny("llama")
    assert GradNorm.per_task_rows

    def run(split: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        balancer = GradNorm([f"t{i}" for i in range(T)])
        balancer.setup(model)
        model.zero_grad(set_to_none=True)
        if split:
            sums, counts, parts = task_token_loss_by_task(model, batch, T)
        else:
            (sums, counts), parts = task_token_loss(model, batch, T), None
        denom = counts.clamp_min(1)
        losses = TaskLosses(local=sums / denom, mean=(sums / denom).detach(), present=counts > 0)
        if parts is not None:
            assert parts[T - 1] is None  # the absent task has no graph at all
            losses.separate = [None if p is None else p / denom[i] for i, p in enumerate(parts)]
        balancer.combine(losses).backward()
        return balancer._acc, sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    acc_split, sums_split, grads_split = run(True)
    acc_whole, sums_whole, grads_whole = run(False)
    assert acc_whole[:3].norm(dim=1).min() > 0 and acc_whole[3].abs().max() == 0
    torch.testing.assert_close(acc_split, acc_whole, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sums_split, sums_whole, rtol=1e-5, atol=1e-5)
    for name, grad in grads_whole.items():
        torch.testing.assert_close(grads_split[name], grad, rtol=1e-4, atol=1e-6, msg=name)
