"""CoBa, the Convergence Balancer (Gong et al., EMNLP 2024, arXiv 2410.06741).

Task weights come from the slopes of the tasks' normalized validation-loss curves, so a task that
still learns gets more weight and a task that has started to overfit gets less. Reference code:
codefuse-ai/MFTCoder (`CoBaStatus` in mftcoder_accelerate/src/utils/loss_utils.py). The math below
follows docs/design.md ("Balancers" / CoBa); where the reference differs, a comment says how.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtft.balancers.base import Balancer
from mtft.core.errors import MtftError
from mtft.core.schema import MAX_INT, Choice, choice, positive, require

log = logging.getLogger(__name__)
REFERENCE_WARMUP = 100  # the reference's warm-up, for runs of 1,000 steps or more


class Probe(Choice):
    """Which validation rows a CoBa probe evaluates."""

    # The same `probe_rows` rows of every task at each probe: every task present, no sampling noise.
    stratified = "stratified"
    # `sample_valid_num` random mixed batches of `trainer.batch_size` rows, as MFTCoder samples them.
    reference = "reference"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def least_squares_slope(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Slope `alpha` of the least-squares line `y = alpha * x + b`, for each row of `y`.

    `x` has shape (n,), `y` shape (..., n). Closed form on centred data,
    `sum (x - x̄)(y - ȳ) / sum (x - x̄)^2`, which stays accurate for large step numbers. Fewer than two
    points (or all `x` equal) carry no trend: the slope is 0, as in the reference.
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if x.numel() < 2:
        return torch.zeros(y.shape[:-1], dtype=torch.float64)
    xc = x - x.mean()
    denom = (xc * xc).sum()
    if denom == 0:
        return torch.zeros(y.shape[:-1], dtype=torch.float64)
    yc = y - y.mean(dim=-1, keepdim=True)
    return (yc * xc).sum(dim=-1) / denom


def _normalize_by_abs_sum(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`values / sum |values|` along `dim`; 0 where that sum is 0 (all slopes flat: no signal)."""
    total = values.abs().sum(dim=dim, keepdim=True)
    return torch.where(total > 0, values / torch.where(total > 0, total, torch.ones_like(total)), 0.0)


class Divergence(Choice):
    """Whose slope the Divergence Factor watches."""

    # The largest task slope max_i alpha_i: DF falls as soon as any task's loss turns up.
    steepest_task = "steepest_task"
    # The slope of the curve max_i v_i (the reference): only sees the task with the least progress.
    max_curve = "max_curve"


@dataclass
class CobaBalancerConfig:
    """CoBa (Gong et al., EMNLP 2024): weights from the slopes of normalized validation-loss curves."""

    _target_: str = "mtft.balancers.coba.CoBa"
    name: str = "coba"
    # Equal weights for the first steps; null: min(100, trainer.max_steps // 10) (the reference's 100).
    warmup_steps: int | None = None
    # Probes in the slope window; null: as many as span 2x warmup_steps (the paper advises 2-5x).
    history_length: int | None = None
    tau: float = 5.0  # temperature of the divergence factor
    update_interval: int = 8  # probe the validation set and update the weights every N steps
    probe: Probe = Probe.stratified  # which validation rows a probe evaluates
    probe_rows: int = 16  # stratified: validation rows of each task per probe
    sample_valid_num: int = 1  # reference: random mixed validation batches per probe
    # The paper's DF = min(DF, 1), so RCS never weighs more than "all of it"; the reference does not cap.
    cap_divergence: bool = True
    divergence: Divergence = Divergence.steepest_task  # whose slope the divergence factor watches
    # Each update moves the weights this fraction of the way to the new ones (1: jump, as the reference).
    smoothing: float = 0.3

    def __post_init__(self) -> None:
        def integer(key: str, low: int, why: str = "") -> None:
            value = getattr(self, key)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            require(ok, f"balancer.{key}", f"an integer >= {low}{why}", value)
            require(value <= MAX_INT, f"balancer.{key}", f"<= {MAX_INT}", value)

        if self.warmup_steps is not None:
            integer("warmup_steps", 0)
        if self.history_length is not None:
            integer("history_length", 2, " (a slope needs two points)")
        positive("balancer.tau", self.tau)
        smoothing, cap = self.smoothing, self.cap_divergence
        require(_number(smoothing) and 0 < smoothing <= 1, "balancer.smoothing", "in (0, 1]", smoothing)
        integer("update_interval", 1)
        self.probe = choice("balancer.probe", Probe, self.probe)
        self.divergence = choice("balancer.divergence", Divergence, self.divergence)
        integer("probe_rows", 1)
        integer("sample_valid_num", 1)
        require(isinstance(cap, bool), "balancer.cap_divergence", "true or false", cap)

    def window(self, max_steps: int | None) -> tuple[int, int]:
        """(warm-up steps, probes in the slope window), the null ones chosen from the run's length."""
        warmup = self.warmup_steps
        if warmup is None:
            warmup = REFERENCE_WARMUP if max_steps is None else min(REFERENCE_WARMUP, max_steps // 10)
        history = self.history_length
        if history is None:
            history = max(2, -(-2 * max(warmup, 1) // self.update_interval))
        return warmup, history


class CoBa(Balancer):
    """Weights from validation-loss slopes: Relative/Absolute Convergence Scores mixed by a Divergence Factor.

    The trainer calls `observe_val(0, L(0))` once, then every `update_interval` steps
    `observe_val(t, L(t))` on the rows `probe_rows` picks. Each call appends the
    normalized loss `v_i(t) = L_i(t) / L_i(0)`; for the first `warmup_steps` steps all weights are
    equal, and from the first probe at `t >= warmup_steps` on, each probe recomputes the weights
    (they apply from step `t + 1`):

    - `alpha_i(t)`: least-squares slope of `v_i` against the step number over the last
      `history_length` probes;
    - `RCS = softmax_i(T * alpha_i / sum_j |alpha_j|)`;
    - `ACS = softmax_i(-N * alpha_i(t) / sum_s |alpha_i(s)|)` over the task's last `history_length`
      slopes since warm-up (N of them);
    - `DF = N * softmax_s(-tau * N * alpha_max(s) / sum_s |alpha_max(s)|)[t]`, `alpha_max` the slope
      of `max_i v_i` over the window, `s` running over every update since warm-up;
    - `w = softmax(T * (DF * RCS + (1 - DF) * ACS))`, and if some `w_i < 1/(10T)`,
      `w <- w * (1 - T/(10T)) + 1/(10T)` (= 0.9 w + 0.1/T), which lifts every weight to at least 1/(10T).

    Weight scale: weights sum to 1 (equal weights are 1/T), the scale the paper and the reference
    report. The loss is `sum_i w_i L_i / sum_{i present} w_i`, so the scale does not change training.

    A task absent from a probe batch repeats its last normalized loss (1.0 before its first probe),
    so every task has one point per probe and `max_i v_i` is defined at every probe. A task absent
    at step 0 takes its `L_i(0)` from its first probe. `diagnostics()` reports the RCS, ACS and DF
    of the latest update (nothing during warm-up).
    """

    config_class = CobaBalancerConfig

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        super().__init__(tasks)
        self.config = cfg = self.config_class(**options)
        self.tau = float(cfg.tau)
        self._reset(*cfg.window(None))

    def plan(self, max_steps: int) -> None:
        """Choose the null warm-up/window from the run's length; warn when the run never leaves warm-up."""
        self._reset(*self.config.window(max_steps))
        if self.warmup_steps >= max_steps:
            log.warning(
                "CoBa never leaves its warm-up: balancer.warmup_steps=%d >= trainer.max_steps=%d, so every "
                "weight stays equal (lower balancer.warmup_steps, or leave it null to choose it from max_steps)",
                self.warmup_steps,
                max_steps,
            )

    def _reset(self, warmup_steps: int, history_length: int) -> None:
        """Empty history for a warm-up of `warmup_steps` steps and a window of `history_length` probes."""
        self.warmup_steps, self.history_length = warmup_steps, history_length
        T = self.num_tasks
        self._initial: list[float | None] = [None] * T  # L_i(0)
        self._last: list[float] = [1.0] * T  # latest v_i, carried over probes that miss the task
        self._steps: deque[int] = deque(maxlen=history_length)  # probe steps in the window
        self._values: deque[list[float]] = deque(maxlen=history_length)  # v(t) per probe in the window
        # ACS: each task's slopes at the updates whose probes are in the window (since warm-up).
        # The reference slices its slope list with an index meant for the loss history, which keeps
        # about `history_length - warmup_steps` slopes; we keep the last `history_length`, as docs/design.md says.
        self._task_slopes: deque[list[float]] = deque(maxlen=history_length)
        # DF: slopes of max_i v_i at every update since warm-up (not windowed, as in the reference).
        self._max_slopes: list[float] = []
        self._weights = torch.full((T,), 1.0 / T, dtype=torch.float64)
        self._rcs: torch.Tensor | None = None
        self._acs: torch.Tensor | None = None
        self._df: float | None = None

    # -- hooks -----------------------------------------------------------------------------------

    def weights(self) -> torch.Tensor:
        return self._weights.to(torch.float32)

    def probe_rows(
        self, step: int, val_rows: Sequence[Sequence[int]], batch_rows: int, generator: torch.Generator
    ) -> list[int] | None:
        """Every `update_interval` steps: the last `probe_rows` rows of every task (stratified), or
        `sample_valid_num` random mixed micro-batches of `batch_rows` rows, as the reference samples
        them (MFTCoder's eval batch is its train batch): the probe runs often."""
        cfg = self.config
        if step % cfg.update_interval:
            return None
        if cfg.probe == Probe.stratified:
            return [row for rows in val_rows for row in rows[-cfg.probe_rows :]]
        total = sum(len(rows) for rows in val_rows)
        return torch.randint(total, (cfg.sample_valid_num * batch_rows,), generator=generator).tolist()

    def observe_val(self, step: int, losses: torch.Tensor, present: torch.Tensor) -> None:
        """Record `L(0)` at step 0; later, append `v(t) = L(t)/L(0)` and (after warm-up) update the weights."""
        values = [float(v) for v in torch.as_tensor(losses).detach().cpu().reshape(-1).tolist()]
        mask = [bool(p) for p in torch.as_tensor(present).detach().cpu().reshape(-1).tolist()]
        if len(values) != self.num_tasks or len(mask) != self.num_tasks:
            raise MtftError(f"CoBa expected {self.num_tasks} per-task losses, got {len(values)}")
        for task, value, has in zip(self.tasks, values, mask, strict=True):
            if has and not (math.isfinite(value) and value > 0):
                raise MtftError(f"CoBa needs finite positive validation losses; task '{task}' has {value}")

        if step == 0:
            for i, (value, has) in enumerate(zip(values, mask, strict=True)):
                if has:
                    self._initial[i] = value
            return

        row = []
        for i, (value, has) in enumerate(zip(values, mask, strict=True)):
            if has:
                if self._initial[i] is None:  # first sighting of a task missing at step 0
                    self._initial[i] = value
                self._last[i] = value / self._initial[i]
            row.append(self._last[i])
        self._steps.append(int(step))
        self._values.append(row)
        if step >= self.warmup_steps:
            self._update()

    def diagnostics(self) -> dict[str, float]:
        if self._df is None or self._rcs is None or self._acs is None:
            return {}
        out = {f"coba/rcs/{t}": float(v) for t, v in zip(self.tasks, self._rcs.tolist(), strict=True)}
        out.update({f"coba/acs/{t}": float(v) for t, v in zip(self.tasks, self._acs.tolist(), strict=True)})
        out["coba/df"] = float(self._df)
        return out

    # -- the update ------------------------------------------------------------------------------

    def _update(self) -> None:
        T = self.num_tasks
        x = torch.tensor(list(self._steps), dtype=torch.float64)
        rows = torch.tensor(list(self._values), dtype=torch.float64)  # (n, T): v(t) per probe

        alpha = least_squares_slope(x, rows.T.contiguous())  # (T,)
        if self.config.divergence == Divergence.max_curve:
            alpha_max = float(least_squares_slope(x, rows.amax(dim=1)))
        else:
            alpha_max = float(alpha.max())
        self._task_slopes.append(alpha.tolist())
        self._max_slopes.append(alpha_max)

        # Relative Convergence Score: the task whose loss falls slowest (or rises) gets more.
        rcs = torch.softmax(T * _normalize_by_abs_sum(alpha), dim=0)

        # Absolute Convergence Score: each task's current slope against its own slope history.
        history = torch.tensor(list(self._task_slopes), dtype=torch.float64).T  # (T, N)
        n_hist = history.shape[1]
        acs = torch.softmax(-n_hist * _normalize_by_abs_sum(history, dim=1)[:, -1], dim=0)

        # Divergence Factor: the current slope of the worst task's curve against its own history.
        max_hist = torch.tensor(self._max_slopes, dtype=torch.float64)
        n_max = max_hist.numel()
        df = float(n_max * torch.softmax(-self.tau * n_max * _normalize_by_abs_sum(max_hist), dim=0)[-1])
        if self.config.cap_divergence:
            df = min(df, 1.0)

        w = torch.softmax(T * (df * rcs + (1.0 - df) * acs), dim=0)
        floor = 1.0 / (10 * T)
        if bool((w < floor).any()):
            w = w * (1.0 - T * floor) + floor
        # A convex step toward the new weights: still on the simplex and above the floor.
        self._weights = self._weights + self.config.smoothing * (w - self._weights)
        self._rcs, self._acs, self._df = rcs, acs, df

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "window": [self.warmup_steps, self.history_length],
            "initial": list(self._initial),
            "last": list(self._last),
            "steps": list(self._steps),
            "values": [list(r) for r in self._values],
            "task_slopes": [list(r) for r in self._task_slopes],
            "max_slopes": list(self._max_slopes),
            "weights": self._weights.tolist(),
            "rcs": None if self._rcs is None else self._rcs.tolist(),
            "acs": None if self._acs is None else self._acs.tolist(),
            "df": self._df,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["tasks"]) != self.tasks:
            raise MtftError(f"CoBa state is for tasks {list(state['tasks'])}, this run has {self.tasks}")
        self._reset(*state["window"])
        self._initial = [None if v is None else float(v) for v in state["initial"]]
        self._last = [float(v) for v in state["last"]]
        self._steps = deque((int(s) for s in state["steps"]), maxlen=self.history_length)
        self._values = deque(([float(v) for v in r] for r in state["values"]), maxlen=self.history_length)
        self._task_slopes = deque(
            ([float(v) for v in r] for r in state["task_slopes"]), maxlen=self.history_length
        )
        self._max_slopes = [float(v) for v in state["max_slopes"]]
        self._weights = torch.tensor(state["weights"], dtype=torch.float64)
        self._rcs = None if state["rcs"] is None else torch.tensor(state["rcs"], dtype=torch.float64)
        self._acs = None if state["acs"] is None else torch.tensor(state["acs"], dtype=torch.float64)
        self._df = None if state["df"] is None else float(state["df"])
