"""FAMO — Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023, arXiv 2306.03792).

FAMO keeps one logit `xi_i` per task (zeros at start) and weights with `z = softmax(xi)`. The model
descends `sum_i z_i log(L_i - m_i + eps) / c`, `c = sum_i z_i / (L_i - m_i + eps)` held constant, so
every task's *log*-loss falls at a similar rate whatever its scale. After each step the logits move
so that tasks whose log-loss fell less get more weight: with `delta_i = log(L_i - m_i + eps) -
log(L'_i - m_i + eps)` (before/after the step), the logits' gradient is the vector–Jacobian product
of `softmax(xi)` with `delta`, taken by one Adam step (`lr`, L2 weight decay `gamma`), as in the
reference code (Cranial-XIX/FAMO, `famo.py`). O(T) extra time and memory; no extra backward.

Where `L'` comes from (`post_step_loss`):

- `recompute` (the default; FAMO's reference experiments and LibMTL's trainer): the trainer
  re-evaluates the step's last micro-batch without gradients after the update, so `L` and `L'` are
  the same batch before and after the step; `L` is the loss `combine` saw on it. Costs one no-grad
  forward of one micro-batch per step.
- `next_batch` (a cheaper approximation, no extra forward): `observe_step(t, L_t)` gets step t's own
  (pre-update, accumulated over micro-batches) losses and updates with `delta = log(L_{t-1} - m +
  eps) - log(L_t - m + eps)` from the stored previous step. The two losses come from different
  batches, so batch-to-batch noise enters `delta`; and since the weights of step t are read before
  its losses exist, the logits lag by one step.

Tasks absent from a batch take no part: `combine` renormalizes `z` over the present tasks, and the
logit update uses only tasks present before *and* after (softmax restricted to them); the logits and
Adam moments of the others are left exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtft.balancers.base import Balancer, TaskLosses, check_task_names
from mtft.core.errors import MtftError
from mtft.core.schema import Choice, at_least, choice, finite, positive


class PostStepLoss(Choice):
    """Where FAMO's post-step loss L' comes from."""

    recompute = "recompute"  # the step's last micro-batch re-evaluated after the update (one no-grad forward)
    next_batch = "next_batch"  # the next step's own losses: free, but a different batch (noisier)


# (per-task losses, present mask), float32 / bool on the CPU
_Observed = tuple[torch.Tensor, torch.Tensor]


@dataclass
class FamoBalancerConfig:
    """FAMO (Liu et al., NeurIPS 2023): task logits trained so every task's log-loss falls at a similar rate."""

    _target_: str = "mtft.balancers.famo.FAMO"
    name: str = "famo"
    lr: float = 0.025  # Adam learning rate of the task logits (reference default)
    # Adam weight decay of the logits (LibMTL's default; the reference's example uses 0.01).
    gamma: float = 0.001
    min_losses: dict[str, float] = field(default_factory=dict)  # per-task loss floor m_i; unlisted tasks: 0
    eps: float = 1e-8  # added inside log(L - m + eps)
    post_step_loss: PostStepLoss = PostStepLoss.recompute

    def __post_init__(self) -> None:
        self.post_step_loss = choice("balancer.post_step_loss", PostStepLoss, self.post_step_loss)
        positive("balancer.lr", self.lr)
        at_least("balancer.gamma", self.gamma, 0)
        positive("balancer.eps", self.eps)
        for task, floor in (self.min_losses or {}).items():
            finite(f"balancer.min_losses.{task}", floor)

    def check_tasks(self, tasks: Sequence[str]) -> None:
        check_task_names("balancer.min_losses", self.min_losses or {}, tasks)


class FAMO(Balancer):
    """Task logits trained online so that every task's log-loss decreases at a similar rate."""

    config_class = FamoBalancerConfig

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        super().__init__(tasks)
        self.config = cfg = self.config_class(**options)
        cfg.check_tasks(self.tasks)
        lr, gamma, eps, post_step_loss = cfg.lr, cfg.gamma, cfg.eps, cfg.post_step_loss
        floors = cfg.min_losses or {}
        self.lr, self.gamma, self.eps = float(lr), float(gamma), float(eps)
        self.post_step_loss = post_step_loss
        self.recompute_after_step = post_step_loss == "recompute"
        self.min_losses = torch.tensor([float(floors.get(t, 0.0)) for t in self.tasks])
        self.logits = torch.zeros(self.num_tasks, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.lr, weight_decay=self.gamma)
        # next_batch: the previous step's losses; recompute: the pre-update losses of the micro-batch
        # the trainer will re-evaluate (the last `combine` of the step).
        self._before: _Observed | None = None
        self._coef = torch.zeros(self.num_tasks)  # last combine's coefficients, for diagnostics

    def weights(self) -> torch.Tensor:
        """`z = softmax(xi)` over all tasks (sums to 1); `combine` renormalizes it over present tasks."""
        return torch.softmax(self.logits.detach(), 0).clone()

    def combine(self, losses: TaskLosses) -> torch.Tensor:
        """`sum_i k_i * local_i` with detached `k_i = z_i / (c * (L_i - m_i + eps))` from the global means.

        FAMO's objective is `F = sum_i z_i log(D_i) / c` with `D_i = L_i - m_i + eps` and `c` constant,
        so `grad F = sum_i z_i / (c D_i) * grad L_i`. Backpropagating the linear form with those
        coefficients frozen (computed from `mean`, the same on every rank) gives exactly that gradient:
        in one process `local == mean`, and across ranks the `local` shares sum to `mean`, whose
        gradient is what the log-form objective would need (the log of a per-rank share would not be).
        The coefficients sum to 1, so the returned value is a weighted mean of the task losses (what the
        trainer logs), not the value of `F`. With gradient accumulation each micro-batch uses its own
        losses for its coefficients.
        """
        present = losses.present.detach().bool().cpu()
        if not bool(present.any()):
            return losses.local.sum() * 0.0
        mean = losses.mean.detach().float().cpu()
        gaps = self._gaps(mean, present)
        z = torch.softmax(self.logits.detach().masked_fill(~present, -math.inf), 0)
        c = (z / gaps)[present].sum()
        coef = torch.where(present, z / (c * gaps), torch.zeros(()))
        self._coef = coef
        if self.recompute_after_step:
            self._before = (mean, present)
        k = coef.to(losses.local.device, losses.local.dtype)
        mask = present.to(losses.local.device)
        return torch.where(mask, k * losses.local, torch.zeros_like(losses.local)).sum()

    def observe_step(self, step: int, losses: TaskLosses) -> None:
        """Update the logits from the losses before and after this step (see `post_step_loss`)."""
        after = (losses.mean.detach().float().cpu(), losses.present.detach().bool().cpu())
        self._gaps(*after)  # fail on a bad loss now, not one step later
        before = self._before
        # next_batch: this step's losses are the "before" of the next update; recompute: the next step's
        # last combine provides it.
        self._before = None if self.recompute_after_step else after
        if before is not None:
            self.update(before, after)

    def update(self, before: _Observed, after: _Observed) -> None:
        """One Adam step on the logits with the softmax VJP of the log-loss decrease.

        Only tasks present in both observations take part: the softmax is restricted to them (the
        same renormalization `combine` uses) and the others' logits and Adam moments stay as they were.
        With fewer than two such tasks the Jacobian is zero and nothing is updated.
        """
        (l0, p0), (l1, p1) = before, after
        both = p0 & p1
        if int(both.sum()) < 2:
            return
        delta = torch.zeros(self.num_tasks)
        delta[both] = self._gaps(l0, both)[both].log() - self._gaps(l1, both)[both].log()
        with torch.enable_grad():
            z = torch.softmax(self.logits.masked_fill(~both, -math.inf), 0)
            (grad,) = torch.autograd.grad(z, self.logits, grad_outputs=delta)
        frozen = ~both
        state = self.optimizer.state.get(self.logits, {})
        kept = {
            k: state[k].detach()[frozen].clone() if k in state else torch.zeros(int(frozen.sum()))
            for k in ("exp_avg", "exp_avg_sq")
        }
        kept_logits = self.logits.detach()[frozen].clone()
        self.optimizer.zero_grad(set_to_none=True)
        self.logits.grad = grad
        self.optimizer.step()
        self.logits.grad = None
        if bool(frozen.any()):
            state = self.optimizer.state[self.logits]
            with torch.no_grad():
                self.logits[frozen] = kept_logits
                for k, v in kept.items():
                    state[k][frozen] = v

    def diagnostics(self) -> dict[str, float]:
        """The logits and the last combine's effective loss coefficients (0 for absent tasks)."""
        out = {f"famo/logit/{t}": v for t, v in zip(self.tasks, self.logits.detach().tolist(), strict=True)}
        out.update({f"famo/coef/{t}": v for t, v in zip(self.tasks, self._coef.tolist(), strict=True)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.detach().clone(),
            "optimizer": _clone(self.optimizer.state_dict()),
            "before": _clone(self._before),
            "coef": self._coef.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.optimizer.load_state_dict(_clone(state["optimizer"]))
        self._before = _clone(state["before"])
        self._coef = state["coef"].clone()

    def _gaps(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """`L_i - m_i + eps` (1 for absent tasks); a non-finite loss or one at/below its floor is an error."""
        gaps = torch.where(present, losses - self.min_losses + self.eps, torch.ones(()))
        bad = present & ~torch.isfinite(gaps)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise MtftError(f"FAMO: task {self.tasks[i]}'s loss is not finite ({losses[i].item()})")
        bad = present & (gaps <= 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise MtftError(
                f"FAMO: task {self.tasks[i]}'s loss {losses[i].item():.6g} is not above its min_loss "
                f"{self.min_losses[i].item():.6g}; log(L - min_loss + eps) is undefined "
                "(lower balancer.min_losses)"
            )
        return gaps


def _clone(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples of tensors, so saved state never aliases live state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj
