"""CoBa on synthetic validation-loss curves fed through `observe_val`: no model, no data, milliseconds."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtft.balancers.coba import CoBa, CobaBalancerConfig, least_squares_slope
from mtft.core.errors import MtftError

VAL_ROWS = [list(range(30)), list(range(30, 50))]  # two tasks' validation rows


def feed(balancer: CoBa, curves: np.ndarray, steps: list[int] | None = None, absent=None) -> list[np.ndarray]:
    """curves: (steps + 1, T) losses, row 0 being L(0). Returns the weights after each probe."""
    steps = list(range(1, len(curves))) if steps is None else steps
    T = curves.shape[1]
    balancer.observe_val(0, torch.tensor(curves[0]), torch.ones(T, dtype=torch.bool))
    out = []
    for k, step in enumerate(steps, start=1):
        present = torch.ones(T, dtype=torch.bool)
        if absent is not None and step in absent:
            present[absent[step]] = False
        losses = torch.tensor(curves[k]) * present  # an absent task's value must not be used
        balancer.observe_val(step, losses, present)
        out.append(balancer.weights().numpy().astype(np.float64))
    return out


def reference_weights(
    curves: np.ndarray,
    steps: list[int],
    warmup: int,
    window: int,
    tau: float,
    divergence: str = "steepest_task",
    cap: bool = False,
    smoothing: float = 1.0,
) -> list[np.ndarray]:
    """docs/design.md's CoBa formulas, written out independently with numpy (every task present)."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max())
        return e / e.sum()

    def safe_div(a: np.ndarray, b: float) -> np.ndarray:
        return a / b if b > 0 else np.zeros_like(a)

    T = curves.shape[1]
    v = curves[1:] / curves[0]
    w = np.full(T, 1.0 / T)
    task_slopes: list[np.ndarray] = []
    max_slopes: list[float] = []
    out = []
    for k, step in enumerate(steps):
        if step >= warmup:
            lo = max(0, k + 1 - window)
            x = np.asarray(steps[lo : k + 1], dtype=np.float64)
            y = v[lo : k + 1]
            alpha = np.array([np.polyfit(x, y[:, i], 1)[0] for i in range(T)]) if len(x) > 1 else np.zeros(T)
            if divergence == "max_curve":  # the slope of the worst task's curve
                a_max = np.polyfit(x, y.max(axis=1), 1)[0] if len(x) > 1 else 0.0
            else:  # the steepest task's slope
                a_max = alpha.max()
            task_slopes = (task_slopes + [alpha])[-window:]
            max_slopes.append(a_max)
            rcs = softmax(T * safe_div(alpha, np.abs(alpha).sum()))
            hist = np.stack(task_slopes, axis=1)  # (T, N)
            n = hist.shape[1]
            acs = softmax(np.array([-n * safe_div(hist[i, -1:], np.abs(hist[i]).sum())[0] for i in range(T)]))
            m = np.asarray(max_slopes)
            df = len(m) * softmax(-tau * len(m) * safe_div(m, np.abs(m).sum()))[-1]
            df = min(df, 1.0) if cap else df
            new = softmax(T * (df * rcs + (1 - df) * acs))
            if (new < 1 / (10 * T)).any():
                new = new * (1 - T / (10 * T)) + 1 / (10 * T)
            w = w + smoothing * (new - w)
        out.append(w.copy())
    return out


def exp_curves(
    rates: list[float], n: int, start: list[float] | None = None, noise: float = 0.0, seed: int = 0
):
    """Losses L_i(t) = start_i * (0.5 + 0.5 * exp(-rate_i * t)) for t = 0..n, optionally noisy."""
    rng = np.random.default_rng(seed)
    t = np.arange(n + 1, dtype=np.float64)[:, None]
    start = np.asarray(start if start is not None else [2.0 + i for i in range(len(rates))])
    curves = start * (0.5 + 0.5 * np.exp(-np.asarray(rates) * t))
    return curves * (1 + noise * rng.standard_normal(curves.shape))


# -- the slope ---------------------------------------------------------------------------------------


def test_slope_is_the_least_squares_fit():
    rng = np.random.default_rng(1)
    x = np.sort(rng.choice(1000, size=37, replace=False)).astype(np.float64) + 10_000  # large, uneven steps
    y = rng.standard_normal((3, 37)) + 0.01 * x
    got = least_squares_slope(torch.tensor(x), torch.tensor(y)).numpy()
    want = [np.polyfit(x, y[i], 1)[0] for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert least_squares_slope(torch.tensor([5.0]), torch.tensor([[1.0], [2.0]])).tolist() == [0.0, 0.0]


def test_slopes_inside_the_balancer_fit_the_last_window_of_probes():
    steps = list(range(3, 3 * 41, 3))  # update_interval 3: probes at 3, 6, ...
    curves = exp_curves([0.05, 0.01, 0.002], len(steps), noise=0.02)
    b = CoBa(["a", "b", "c"], warmup_steps=0, history_length=12, update_interval=3)
    feed(b, curves, steps)
    slopes = b.state_dict()["task_slopes"][-1]
    v = curves[1:] / curves[0]
    x = np.asarray(steps[-12:], dtype=np.float64)
    np.testing.assert_allclose(slopes, [np.polyfit(x, v[-12:, i], 1)[0] for i in range(3)], rtol=1e-9)
    assert [t for t in range(1, 10) if b.probe_rows(t, VAL_ROWS, 4, torch.Generator()) is not None] == [
        3,
        6,
        9,
    ]


# -- the weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tau, divergence, cap, smoothing",
    [
        (1.0, "max_curve", False, 1.0),  # the reference
        (5.0, "max_curve", False, 1.0),
        (5.0, "steepest_task", False, 1.0),
        (5.0, "steepest_task", True, 0.3),  # the defaults
    ],
)
def test_weights_match_the_design_formulas(tau, divergence, cap, smoothing):
    rng = np.random.default_rng(7)
    n = 80
    t = np.arange(n + 1)[:, None]
    # Four shapes: fast, slow, overfitting after step 30, flat -- plus noise.
    curves = np.concatenate(
        [
            3 * (0.4 + 0.6 * np.exp(-0.15 * t)),
            2 * (0.6 + 0.4 * np.exp(-0.01 * t)),
            4 * (1 - 0.02 * t + 0.0003 * t**2),
            np.full_like(t, 1.5, dtype=np.float64),
        ],
        axis=1,
    ) * (1 + 0.01 * rng.standard_normal((n + 1, 4)))
    steps = list(range(1, n + 1))
    options = {"tau": tau, "divergence": divergence, "cap_divergence": cap, "smoothing": smoothing}
    b = CoBa(list("abcd"), warmup_steps=10, history_length=20, **options)
    got = feed(b, curves, steps)
    want = reference_weights(
        curves, steps, warmup=10, window=20, tau=tau, divergence=divergence, cap=cap, smoothing=smoothing
    )
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-6)


def test_equal_weights_during_warmup_then_they_move():
    curves = exp_curves([0.2, 0.01, 0.05], 40)
    b = CoBa(["a", "b", "c"], warmup_steps=15, history_length=30)
    assert b.weights().tolist() == pytest.approx([1 / 3] * 3)
    b.observe_val(0, torch.tensor(curves[0]), torch.ones(3, dtype=torch.bool))
    for step in range(1, 15):  # the weights applied at steps 1..15 are those held after probes 0..14
        b.observe_val(step, torch.tensor(curves[step]), torch.ones(3, dtype=torch.bool))
        assert torch.equal(b.weights(), torch.full((3,), 1 / 3))
        assert b.diagnostics() == {}
    b.observe_val(15, torch.tensor(curves[15]), torch.ones(3, dtype=torch.bool))  # first update
    assert not np.allclose(b.weights().numpy(), 1 / 3, atol=1e-3)
    assert set(b.diagnostics()) == {"coba/df", *(f"coba/{s}/{t}" for s in ("rcs", "acs") for t in "abc")}


@pytest.mark.parametrize("shape", ["linear", "exponential"])
def test_slowest_converging_task_gets_the_largest_weight(shape):
    # All three tasks keep learning over the run (none plateaus), at different speeds; "slow" is slowest.
    n = 100
    t = np.arange(n + 1, dtype=np.float64)[:, None]
    if shape == "linear":
        curves = np.array([3.0, 2.0, 4.0]) * (1 - np.array([0.004, 0.001, 0.002]) * t)
    else:
        curves = exp_curves([0.01, 0.002, 0.005], n)
    curves = curves * (1 + 0.001 * np.random.default_rng(3).standard_normal(curves.shape))
    b = CoBa(["fast", "slow", "mid"], warmup_steps=20, history_length=50)
    weights = feed(b, curves)
    for w in weights[19:]:  # every update after warm-up
        assert int(np.argmax(w)) == 1
        assert w[1] > w[2] > w[0]  # slower convergence -> more weight
    diag = b.diagnostics()
    assert max(diag[f"coba/rcs/{t}"] for t in b.tasks) == diag["coba/rcs/slow"]


def test_task_that_starts_overfitting_loses_weight_within_a_window():
    n, turn, window = 120, 50, 20
    t = np.arange(n + 1, dtype=np.float64)
    a = 3 * (0.5 + 0.5 * np.exp(-0.03 * t))
    b_ = 2 * (0.5 + 0.5 * np.exp(-0.02 * t))
    # Task "over" learns fastest, then its loss turns upward at `turn` (overfitting).
    over = np.where(t <= turn, 4 * (0.5 + 0.5 * np.exp(-0.06 * t)), 0.0)
    over[turn + 1 :] = over[turn] * (1 + 0.004 * (t[turn + 1 :] - turn))
    curves = np.stack([a, b_, over], axis=1)
    bal = CoBa(["a", "b", "over"], warmup_steps=10, history_length=window)
    weights = np.stack(feed(bal, curves))
    before = weights[turn - 1, 2]  # weight after the probe at step `turn`
    after = weights[turn + window - 1, 2]  # one window later
    assert after < before / 2
    assert int(np.argmin(weights[turn + window - 1])) == 2
    assert bal.diagnostics()["coba/df"] < 0.5  # divergence detected: weight shifts from RCS to ACS


@pytest.mark.parametrize("seed", range(6))
def test_weights_stay_on_the_simplex_above_the_floor(seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(2, 9))
    n = 60
    # Random walks of mixed drift: some tasks fall, some rise, some are flat; one probe misses tasks.
    steps = rng.normal(0, 0.02, size=(n, T)) + rng.uniform(-0.03, 0.02, size=T)
    curves = np.vstack([np.ones(T), np.exp(np.cumsum(steps, axis=0))]) * rng.uniform(1, 5, size=T)
    absent = {k: [int(i) for i in rng.choice(T, size=T - 1, replace=False)] for k in (5, 33)}
    b = CoBa([f"t{i}" for i in range(T)], warmup_steps=int(rng.integers(0, 10)), history_length=15)
    for w in feed(b, curves, absent=absent):
        assert np.isfinite(w).all()
        assert w.sum() == pytest.approx(1.0, abs=1e-6)
        assert (w >= 1 / (10 * T) - 1e-7).all()


def test_floor_lifts_small_weights_by_the_rescaling_rule():
    # Eight tasks: seven flat, one whose loss rises. All the RCS mass goes to the rising one and, with
    # DF = 1 (its slope is constant), the raw softmax starves the other seven below 1/(10T).
    t = np.arange(41, dtype=np.float64)
    curves = np.full((41, 8), 2.0)
    curves[:, 7] = 2.0 + 0.01 * t
    b = CoBa([f"t{i}" for i in range(8)], warmup_steps=5, history_length=10, smoothing=1.0)
    feed(b, curves)
    d = b.diagnostics()
    rcs = np.array([d[f"coba/rcs/t{i}"] for i in range(8)])
    acs = np.array([d[f"coba/acs/t{i}"] for i in range(8)])
    logits = 8 * (d["coba/df"] * rcs + (1 - d["coba/df"]) * acs)
    raw = np.exp(logits - logits.max())
    raw /= raw.sum()
    assert raw.min() < 1 / 80  # the floor is needed here
    np.testing.assert_allclose(b.weights().numpy(), raw * 0.9 + 1 / 80, rtol=1e-6)
    assert b.weights().min() >= 1 / 80 - 1e-7


def test_flat_losses_give_equal_weights_without_nan():
    curves = np.full((30, 3), 2.0)
    b = CoBa(["a", "b", "c"], warmup_steps=0, history_length=5)
    for w in feed(b, curves):
        np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)
    d = b.diagnostics()
    assert d["coba/df"] == pytest.approx(1.0) and d["coba/rcs/a"] == pytest.approx(1 / 3)


def test_absent_task_repeats_its_last_normalized_loss():
    curves = exp_curves([0.1, 0.02], 10)
    b = CoBa(["a", "b"], warmup_steps=100, history_length=20)
    feed(b, curves, absent={4: [1], 7: [0, 1]})
    v = b.state_dict()["values"]
    assert v[3][1] == v[2][1] == pytest.approx(curves[3, 1] / curves[0, 1])  # step 4 repeats step 3
    assert v[6] == v[5]
    assert v[3][0] == pytest.approx(curves[4, 0] / curves[0, 0])


def test_task_missing_at_step_zero_is_normalized_by_its_first_probe():
    b = CoBa(["a", "b"], warmup_steps=0, history_length=5)
    b.observe_val(0, torch.tensor([2.0, 0.0]), torch.tensor([True, False]))
    b.observe_val(1, torch.tensor([1.8, 0.0]), torch.tensor([True, False]))
    b.observe_val(2, torch.tensor([1.6, 3.0]), torch.tensor([True, True]))
    b.observe_val(3, torch.tensor([1.5, 2.7]), torch.tensor([True, True]))
    v = b.state_dict()["values"]
    assert [r[1] for r in v] == pytest.approx([1.0, 1.0, 0.9])
    assert torch.isfinite(b.weights()).all()


def test_non_positive_validation_loss_is_an_error():
    b = CoBa(["a", "b"])
    with pytest.raises(MtftError, match="positive"):
        b.observe_val(0, torch.tensor([2.0, 0.0]), torch.tensor([True, True]))
    with pytest.raises(MtftError, match="positive"):
        b.observe_val(0, torch.tensor([2.0, float("nan")]), torch.tensor([True, True]))


# -- state -----------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_bit_identically():
    curves = exp_curves([0.1, 0.01, 0.04], 70, noise=0.01, seed=5)
    absent = {20: [2], 45: [0]}
    full = CoBa(["a", "b", "c"], warmup_steps=10, history_length=15)
    full_weights = feed(full, curves, absent=absent)

    first = CoBa(["a", "b", "c"], warmup_steps=10, history_length=15)
    feed(first, curves[:31], absent=absent)  # steps 1..30
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # through a checkpoint file, as the trainer saves it
    buf.seek(0)
    resumed = CoBa(["a", "b", "c"], warmup_steps=10, history_length=15)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(resumed.weights(), first.weights())
    for k in range(31, 71):
        present = torch.ones(3, dtype=torch.bool)
        if k in absent:
            present[absent[k]] = False
        resumed.observe_val(k, torch.tensor(curves[k]) * present, present)
        assert np.array_equal(resumed.weights().numpy(), full_weights[k - 1]), k
    assert resumed.diagnostics() == full.diagnostics()
    assert resumed.state_dict() == full.state_dict()


def test_state_dict_is_a_snapshot_and_checks_the_tasks():
    b = CoBa(["a", "b"], warmup_steps=0, history_length=4)
    feed(b, exp_curves([0.1, 0.02], 5))
    snap = copy.deepcopy(b.state_dict())
    b.observe_val(6, torch.tensor([1.0, 2.0]), torch.tensor([True, True]))
    assert b.state_dict() != snap
    with pytest.raises(MtftError, match="tasks"):
        CoBa(["a", "c"]).load_state_dict(snap)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"history_length": 1},
        {"history_length": 0},
        {"tau": 0.0},
        {"tau": -1.0},
        {"tau": math.inf},
        {"warmup_steps": -1},
        {"update_interval": 0},
        {"sample_valid_num": 0},
    ],
)
def test_bad_hyperparameters_raise(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(MtftError, match=key):
        CoBa(["a", "b"], **kwargs)


def test_built_from_the_config_schema_like_the_trainer_does():
    cfg = OmegaConf.merge(OmegaConf.structured(CobaBalancerConfig), {"warmup_steps": 7, "update_interval": 2})
    b = instantiate(cfg, tasks=["a", "b"])
    assert isinstance(b, CoBa)
    assert (b.warmup_steps, b.history_length, b.tau) == (7, 7, 5.0)  # the window spans 2x warm-up
    probe = b.probe_rows(2, VAL_ROWS, 4, torch.Generator())
    assert (
        probe == VAL_ROWS[0][-16:] + VAL_ROWS[1][-16:]
        and b.probe_rows(3, VAL_ROWS, 4, torch.Generator()) is None
    )
    assert b.weights().tolist() == [0.5, 0.5]
    assert b.recompute_after_step is False


def test_tiny_recipe_composes(run_mtft):
    """The command at the top of conf/experiment/coba_tiny.yaml composes (`--cfg job`: no training)."""
    proc = run_mtft("train", "experiment=coba_tiny", "--cfg", "job")
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.balancer._target_ == "mtft.balancers.coba.CoBa"
    window = cfg.balancer.history_length * cfg.balancer.update_interval  # in steps
    assert cfg.balancer.warmup_steps < window <= 5 * cfg.balancer.warmup_steps
    assert cfg.trainer.max_steps > cfg.balancer.history_length


def test_balancer_group_defaults(run_mtft):
    proc = run_mtft("train", "balancer=coba", "--cfg", "job")
    bal = OmegaConf.create(proc.stdout).balancer
    assert dict(bal) == {
        "_target_": "mtft.balancers.coba.CoBa",
        "name": "coba",
        "warmup_steps": None,
        "history_length": None,
        "tau": 5.0,
        "update_interval": 8,
        "probe": "stratified",
        "probe_rows": 16,
        "sample_valid_num": 1,
        "cap_divergence": True,
        "divergence": "steepest_task",
        "smoothing": 0.3,
    }


def test_reference_mode_samples_as_mftcoder_does(run_mtft):
    """balancer=coba_reference: one random mixed micro-batch every step, the max-curve divergence
    factor, and from 1,000 steps on the reference's warm-up 100 and window 200."""
    proc = run_mtft("train", "balancer=coba_reference", "--cfg", "job")
    cfg = OmegaConf.create(proc.stdout).balancer
    b = instantiate(cfg, tasks=["a", "b"])
    assert cfg.name == "coba_reference"
    # every step, one random mixed micro-batch drawn from the whole validation set
    draw = [b.probe_rows(step, VAL_ROWS, 4, torch.Generator().manual_seed(0)) for step in (1, 2)]
    assert draw[0] == draw[1] == torch.randint(50, (4,), generator=torch.Generator().manual_seed(0)).tolist()
    assert b.config.divergence == "max_curve" and not b.config.cap_divergence
    b.plan(5000)
    assert (b.warmup_steps, b.history_length) == (100, 200)


@pytest.mark.parametrize(
    "max_steps, options, window",
    [
        (300, {}, (30, 8)),  # 10% warm-up; 2x warm-up in probes of every 8 steps
        (5000, {}, (100, 25)),  # the reference's warm-up from 1,000 steps on
        (300, {"update_interval": 1}, (30, 60)),
        (300, {"warmup_steps": 50}, (50, 13)),
        (300, {"warmup_steps": 50, "history_length": 9}, (50, 9)),
        (10, {}, (1, 2)),
    ],
)
def test_warmup_and_window_follow_the_run_length(max_steps, options, window):
    b = CoBa(["a", "b"], **options)
    b.plan(max_steps)
    assert (b.warmup_steps, b.history_length) == window
    assert b.state_dict()["window"] == list(window)


def test_a_run_that_never_leaves_warmup_is_warned_about(caplog):
    b = CoBa(["a", "b"], warmup_steps=100)
    with caplog.at_level("WARNING"):
        b.plan(30)
    assert "never leaves its warm-up" in caplog.text and "max_steps=30" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        CoBa(["a", "b"]).plan(30)  # the rule's warm-up always ends within the run
    assert caplog.text == ""


def test_capped_divergence_factor_never_exceeds_one():
    # Losses falling faster and faster: the current max slope is the most negative of the history,
    # so the uncapped DF exceeds 1 (RCS amplified, ACS inverted); capped, it is exactly 1.
    t = np.arange(61, dtype=np.float64)[:, None]
    curves = np.array([3.0, 2.0, 4.0]) * (1 - np.array([1e-4, 2e-4, 1.5e-4]) * t**2)
    free = CoBa(["a", "b", "c"], warmup_steps=5, history_length=10, cap_divergence=False)
    capped = CoBa(["a", "b", "c"], warmup_steps=5, history_length=10)  # capped by default
    feed(free, curves)
    feed(capped, curves)
    assert free.diagnostics()["coba/df"] > 1
    assert capped.diagnostics()["coba/df"] == 1.0


def test_divergence_of_a_task_that_is_not_the_worst_one():
    """The overfitting task has made the most progress, so max_i v_i is another task's curve: the
    reference's max-curve DF misses the turn, the steepest-task DF sees it and cuts the task's weight."""
    n, turn = 120, 40
    t = np.arange(n + 1, dtype=np.float64)
    slow = 4 * (1 - 0.002 * t)  # v ends near 0.76: the worst curve throughout
    mid = 3 * (0.6 + 0.4 * np.exp(-0.02 * t))
    over = 2 * (0.5 + 0.5 * np.exp(-0.08 * t))
    over[turn:] = over[turn] * (1 + 0.003 * (t[turn:] - turn))  # turns up, still far below slow's v
    curves = np.stack([slow, mid, over], axis=1)
    last = {}
    for divergence in ("max_curve", "steepest_task"):
        b = CoBa(["slow", "mid", "over"], warmup_steps=10, history_length=20, divergence=divergence)
        last[divergence] = (feed(b, curves)[-1], b.diagnostics()["coba/df"])
    (w_curve, df_curve), (w_task, df_task) = last["max_curve"], last["steepest_task"]
    assert df_curve > 0.5 and df_task < 0.5
    assert w_task[2] < w_curve[2] and int(np.argmin(w_task)) == 2
