"""GradNorm (Chen et al., ICML 2018, arXiv 1711.02257): weights that equalize gradient norms by training rate.

Each task has a learnable weight `w_i` (1 at start, renormalized to `sum_i w_i = T` after every update).
On a set `W` of shared parameters (by default the model's last transformer block) it measures
`G_i = || grad_W (w_i L_i) ||_2` and pulls it toward `G_bar * r_i^alpha`, where `G_bar = mean_i G_i`
and `r_i = (L_i(t)/L_i(0)) / mean_j (L_j(t)/L_j(0))` is the inverse training rate: a task that has
trained less than the others (relative to its own first loss) is given a larger gradient.

How it meets the trainer:

- `combine` (once per micro-batch) takes `grad_W L_i` of every present task with one
  `autograd.grad` per task and adds it to a per-task accumulator. Since `w_i` is a scalar constant for
  `W`, `grad_W (w_i L_i) = w_i grad_W L_i`; `w_i` is applied in `observe_step`, so micro-batches of one
  step are summed without caring about weights. It returns the default combined loss
  `sum_i w_i L_i / sum_{i present} w_i` (with all tasks present `sum_i w_i = T`, i.e. the paper's
  `sum_i w_i L_i` divided by the constant T, like the uniform baseline).
- `observe_step` (once per optimizer step) all-reduces the accumulated gradients over ranks (so every
  rank computes identical `G_i` and weights), averages them over the micro-batches where the task was
  present (the gradient of the step's task loss), computes the gradient loss
  `sum_i |G_i - stopgrad(G_bar r_i^alpha)|` over the tasks present in the step, and takes one Adam step
  on `w` alone. Tasks absent from the step get no gradient and no Adam step (their Adam state is not
  advanced); with fewer than two tasks present the gradient loss is identically zero and no update is
  made. `L_i(0)` is task i's loss at the first step where it is present.
- Weights are floored at `MIN_WEIGHT` before renormalizing, so an Adam overshoot can never flip the
  sign of a task's loss; in normal operation the floor is inactive.

Cost: one `autograd.grad` per present task per micro-batch, back to `W` only (the LM head, final norm
and the last block), plus `T x |W|` float32 of accumulator memory and one all-reduce of it per step.
`per_task_rows` makes the trainer run each task's rows in a forward of their own and hand over each
task's loss as a separate autograd root (`TaskLosses.separate`): task i's loss depends on its rows
only, so its gradient is the same, but its `autograd.grad` now runs over its rows instead of the
whole batch, and all of them together cost about one backward of the batch, whatever T.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtft.balancers.base import Balancer, TaskLosses
from mtft.core.dist import all_reduce_sum
from mtft.core.errors import MtftError
from mtft.core.schema import require

log = logging.getLogger("mtft")

MIN_WEIGHT = 1e-4  # positivity floor applied before renormalizing to sum T
# A parameter inside a numbered block of a stack: `model.layers.3.`, `transformer.h.11.`,
# `gpt_neox.layers.5.`, `encoder.layer.2.`, `blocks.0.` (any prefix, e.g. PEFT's or DDP's `module.`).
BLOCK_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block))\.(\d+)\.")


def last_block(names: Sequence[str]) -> list[str]:
    """Names in the highest-numbered block of the last block stack (in parameter order), or []."""
    matches = [(n, BLOCK_RE.match(n)) for n in names]
    found = [(n, m.group(1), int(m.group(2))) for n, m in matches if m]
    if not found:
        return []
    stack = found[-1][1]
    index = max(i for _, s, i in found if s == stack)
    return [n for n, s, i in found if s == stack and i == index]


@dataclass
class GradNormBalancerConfig:
    """GradNorm (Chen et al., ICML 2018): learnable weights that equalize gradient norms by training rate."""

    _target_: str = "mtft.balancers.gradnorm.GradNorm"
    name: str = "gradnorm"
    # Restoring-force strength: 0 equalizes gradient norms; larger pushes harder toward equal training rates.
    alpha: float = 1.5
    lr: float = 0.025  # learning rate of the weights' own Adam optimizer (separate from trainer.lr)
    # Regex over parameter names (re.search) selecting W; null = the last transformer block
    # (e.g. model.layers.<last>., transformer.h.<last>., gpt_neox.layers.<last>.). Only trainable
    # parameters count, so with LoRA it is the last block's adapters.
    shared_params: str | None = None

    def __post_init__(self) -> None:
        require(
            isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha >= 0,
            "balancer.alpha",
            "a finite number >= 0",
            self.alpha,
        )
        require(
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0,
            "balancer.lr",
            "a finite number > 0",
            self.lr,
        )
        if self.shared_params is not None:
            if not self.shared_params:
                raise MtftError("balancer.shared_params is empty; use null for the last transformer block")
            try:
                re.compile(self.shared_params)
            except re.error as e:
                raise MtftError(
                    f"balancer.shared_params '{self.shared_params}' is not a valid regex: {e}"
                ) from None


class GradNorm(Balancer):
    """Learnable task weights trained to match gradient norms on `W` to `G_bar * r_i^alpha`."""

    needs_parameters = True
    per_task_rows = True

    config_class = GradNormBalancerConfig

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        super().__init__(tasks)
        self.config = cfg = self.config_class(**options)
        self.alpha, self.lr, self.pattern = float(cfg.alpha), float(cfg.lr), cfg.shared_params
        # One scalar per task so an absent task can be left out of the Adam step entirely.
        self._params = [torch.ones((), requires_grad=True) for _ in self.tasks]
        self._opt = torch.optim.Adam(self._params, lr=self.lr)
        self._l0 = torch.full((self.num_tasks,), math.nan)  # L_i(0), NaN until task i is first present
        self._shared: list[torch.nn.Parameter] | None = None
        self.shared_names: list[str] = []
        self._acc: torch.Tensor | None = None  # (T, |W|) summed grad_W L_i of this step's micro-batches
        self._count = torch.zeros(self.num_tasks)  # micro-batches of this step where task i was present
        self._diag: dict[str, float] = {}

    def weights(self) -> torch.Tensor:
        return torch.stack([p.detach() for p in self._params]).clone()

    def setup(self, model: torch.nn.Module) -> None:
        """Pick `W`: trainable parameters matching `shared_params`, else the last transformer block."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.pattern is not None:
            regex = re.compile(self.pattern)
            chosen = {n for n, _ in named if regex.search(n)}
            if not chosen:
                raise MtftError(
                    f"balancer.shared_params '{self.pattern}' matches no trainable parameter of the model "
                    f"(e.g. {', '.join(n for n, _ in named[:3]) or 'none are trainable'})"
                )
        else:
            chosen = set(last_block([n for n, _ in named]))
            if not chosen:
                raise MtftError(
                    "GradNorm found no transformer blocks (names like 'layers.<i>.', 'h.<i>.', 'blocks.<i>.') "
                    "among the model's trainable parameters; set balancer.shared_params to a regex over "
                    f"parameter names (e.g. {', '.join(n for n, _ in named[:3]) or 'none are trainable'})"
                )
        self._shared = [p for n, p in named if n in chosen]
        self.shared_names = [n for n, _ in named if n in chosen]
        size = sum(p.numel() for p in self._shared)
        log.info(
            "gradnorm: shared parameters W = %d tensors, %d parameters (%s ...)",
            len(self._shared),
            size,
            self.shared_names[0],
        )

    def combine(self, losses: TaskLosses) -> torch.Tensor:
        """Accumulate `grad_W L_i` per present task, then return the weighted loss for the model."""
        if self._shared is None:
            raise MtftError("GradNorm needs the model's shared parameters: call setup(model) before combine")
        if not losses.local.requires_grad:
            raise MtftError("GradNorm needs differentiable task losses (losses.local has no autograd graph)")
        shared = self._shared
        if self._acc is None:
            size = sum(p.numel() for p in shared)
            self._acc = torch.zeros(self.num_tasks, size, dtype=torch.float32, device=shared[0].device)
        present = losses.present.detach().bool().cpu()
        for i in present.nonzero().flatten().tolist():
            self._count[i] += 1
            loss = losses.local[i] if losses.separate is None else losses.separate[i]
            if loss is None or not loss.requires_grad:  # this rank holds no tokens of task i: zero gradient
                continue
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            flat = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).to(self._acc)
                    for g, p in zip(grads, shared, strict=True)
                ]
            )
            self._acc[i] += flat
        return super().combine(losses)

    def observe_step(self, step: int, losses: TaskLosses) -> None:
        """One Adam step of `w` on the gradient loss, from this step's gradients and losses."""
        loss = losses.mean.detach().float().cpu()
        present = losses.present.detach().bool().cpu() & torch.isfinite(loss)
        first = present & torch.isnan(self._l0)
        self._l0[first] = loss[first]
        if self._acc is None:  # no combine this step (standalone use): nothing to measure
            return
        acc, count = all_reduce_sum(self._acc), self._count
        self._acc, self._count = None, torch.zeros(self.num_tasks)
        # Norm of the mean gradient over the micro-batches where each task was present.
        g = torch.linalg.vector_norm(acc, dim=1).cpu() / count.clamp_min(1)
        del acc
        active = present & (count > 0)
        self._diag = {}
        if int(active.sum()) < 2:  # G_bar = G_i and r_i = 1: the gradient loss is identically 0
            return
        idx = active.nonzero().flatten().tolist()
        w = torch.stack([self._params[i] for i in idx])
        G = w * g[idx]  # G_i = ||grad_W (w_i L_i)|| = w_i ||grad_W L_i||, differentiable in w
        ratio = loss[idx] / self._l0[idx]
        r = ratio / ratio.mean()
        target = (G.mean() * r.pow(self.alpha)).detach()
        grad_loss = (G - target).abs().sum()
        self._opt.zero_grad(set_to_none=True)
        active_params = [self._params[i] for i in idx]
        for p, grad in zip(active_params, torch.autograd.grad(grad_loss, active_params), strict=True):
            p.grad = grad
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            new = torch.stack([p.detach() for p in self._params]).clamp_min(MIN_WEIGHT)
            new = new * (self.num_tasks / new.sum())
            for p, value in zip(self._params, new, strict=True):
                p.copy_(value)
        self._diag["gradnorm/grad_loss"] = grad_loss.item()
        for k, i in enumerate(idx):
            self._diag[f"gradnorm/G/{self.tasks[i]}"] = G[k].item()
            self._diag[f"gradnorm/target/{self.tasks[i]}"] = target[k].item()
            self._diag[f"gradnorm/r/{self.tasks[i]}"] = r[k].item()

    def diagnostics(self) -> dict[str, float]:
        """`G_i`, its target `G_bar r_i^alpha` and `r_i` of the tasks in the last update, and the gradient loss."""
        return dict(self._diag)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "weights": self.weights(),
            "optimizer": copy.deepcopy(self._opt.state_dict()),
            "initial_losses": self._l0.clone(),
            "pending_grads": None if self._acc is None else self._acc.detach().clone(),
            "pending_counts": self._count.clone(),
            "diagnostics": dict(self._diag),
            "shared_names": list(self.shared_names),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks:
            raise MtftError(f"GradNorm state is for tasks {state['tasks']}, this run has {self.tasks}")
        if self.shared_names and state["shared_names"] and state["shared_names"] != self.shared_names:
            raise MtftError(
                "GradNorm state was saved with different shared parameters W than this run selects"
            )
        with torch.no_grad():
            for p, value in zip(self._params, state["weights"], strict=True):
                p.copy_(value)
        self._opt.load_state_dict(copy.deepcopy(state["optimizer"]))
        self._l0 = state["initial_losses"].clone()
        pending = state["pending_grads"]
        self._acc = None if pending is None else pending.clone()
        if self._acc is not None and self._shared is not None:
            self._acc = self._acc.to(self._shared[0].device)
        self._count = state["pending_counts"].clone()
        self._diag = dict(state["diagnostics"])
