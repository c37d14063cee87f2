"""Loggers: metrics rows as named series; wandb (offline) and TensorBoard files written by a real run."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest
import yaml

from mtft.loggers.config import LoggerConfig, WandbConfig
from mtft.loggers.console import ConsoleSink
from mtft.loggers.context import RunContext, redact
from mtft.loggers.series import row_series, series_by_step
from mtft.loggers.wandb import init_kwargs, previous_run_id
from mtft.recipe.config import TrainConfig

from conftest import read_metrics, read_wandb_records

TASKS = ["code_completion", "docstring_to_code", "code_to_docstring", "function_naming"]
TINY = [
    "trainer.max_steps=4",
    "trainer.eval_interval=2",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=16",
    "trainer.batch_size=8",
    "trainer.save_model=false",
]
FAKE_KEY = "fakekey0123456789abcdef0123456789abcdef01"
CANARY = "canary0123456789"


# --- series naming (no run needed) --------------------------------------------------------------


def test_rows_map_to_named_series():
    rows = [
        {"step": 3, "split": "train", "task": "sql", "loss": 1.5, "weight": 0.7},
        {"step": 3, "split": "train", "task": "chat", "loss": None, "weight": 0.3},
        {
            "step": 3,
            "split": "train",
            "task": "all",
            "loss": 1.2,
            "lr": 1e-3,
            "grad_norm": 0.5,
            "tokens_per_s": 900.0,
            "coba/rcs/sql": 0.6,
            "famo/logit/chat": -0.1,
        },
    ]
    assert series_by_step(rows) == {
        3: {
            "train/sql/loss": 1.5,
            "weight/sql": 0.7,
            "weight/chat": 0.3,  # no loss: the task was absent from the batch, so no fake point
            "train/loss": 1.2,
            "train/lr": 1e-3,
            "train/grad_norm": 0.5,
            "train/tokens_per_s": 900.0,
            "coba/rcs/sql": 0.6,
            "famo/logit/chat": -0.1,
        }
    }
    assert row_series({"step": 50, "split": "val", "task": "sql", "loss": 2.0}) == {"val/sql/loss": 2.0}
    assert row_series({"step": 50, "split": "val", "task": "all", "loss": 2.0}) == {"val/loss": 2.0}
    assert row_series({"step": 1, "split": "train", "task": "all", "loss": float("nan"), "ok": True}) == {}


def test_secrets_never_reach_a_logged_config():
    config = {
        "model": {"name_or_path": "x", "token": "hf_secret", "pad_token": "<pad>"},
        "logger": {"wandb": {"api_key": "k", "project": "p"}},
        "extra": [{"client_secret": "s", "password": "p", "n": 1}],
        "trainer": {"max_tokens": 5},
    }
    assert redact(config) == {
        "model": {"name_or_path": "x", "pad_token": "<pad>"},
        "logger": {"wandb": {"project": "p"}},
        "extra": [{"n": 1}],
        "trainer": {"max_tokens": 5},
    }


def test_wandb_names_come_from_the_sweep_and_choices(tmp_path):
    ctx = RunContext(
        run_dir=tmp_path,
        config={"seed": 1},
        choices={"balancer": "custom", "data": "codetasks", "model": "tiny"},
        balancer="coba",
        sweep_dir="multirun/2026-11-24/12-00-00",
    )
    kw = init_kwargs(WandbConfig(enabled=True, mode="offline", tags=["mine"]), ctx)
    assert kw["group"] == "multirun/2026-11-24/12-00-00" and kw["name"] == "coba seed=1"
    assert kw["job_type"] == "coba" and kw["tags"] == ["balancer=coba", "data=codetasks", "mine"]
    assert kw["dir"] == str(tmp_path) and kw["mode"] == "offline" and kw["config"]["seed"] == 1
    explicit = init_kwargs(WandbConfig(enabled=True, name="n", group="g", job_type="j"), ctx)
    assert (explicit["name"], explicit["group"], explicit["job_type"], explicit["mode"]) == (
        "n",
        "g",
        "j",
        None,
    )


def test_a_resumed_run_continues_its_wandb_run(tmp_path):

    ctx = RunContext(run_dir=tmp_path)
    assert previous_run_id(ctx) is None
    (tmp_path / "wandb" / "latest-run").mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run" / "run-ab12cd34.wandb").write_bytes(b"")
    assert previous_run_id(ctx) == "ab12cd34"


def test_wandb_mode_is_checked(tmp_path):
    from mtft.core.errors import MtftError

    with pytest.raises(MtftError, match=r"logger.wandb.mode must be one of \[online, offline, disabled\]"):
        WandbConfig(enabled=True, mode="ofline")


def test_logger_options_compose(run_mtft):
    def logger_cfg(*overrides: str) -> dict:
        return yaml.safe_load(run_mtft("train", *overrides, "--cfg", "job").stdout)["logger"]

    default = logger_cfg()
    assert not default["wandb"]["enabled"] and not default["tensorboard"]["enabled"]
    both = logger_cfg("logger=all")
    assert both["wandb"]["enabled"] and both["tensorboard"]["enabled"]
    assert logger_cfg("logger=[wandb,tensorboard]") == both
    only = logger_cfg("logger=wandb", "logger.wandb.mode=offline")
    assert only["wandb"]["mode"] == "offline" and not only["tensorboard"]["enabled"]


def test_progress_line_shows_each_tasks_weight(caplog):
    sink = ConsoleSink(["a", "b", "c"], max_steps=10, progress=False)
    rows = [
        {"step": 1, "split": "train", "task": "a", "loss": 1.0, "weight": 0.5},
        {"step": 1, "split": "train", "task": "b", "loss": 1.0, "weight": 0.3},
        {"step": 1, "split": "train", "task": "c", "loss": None, "weight": 0.2},
        {"step": 1, "split": "train", "task": "all", "loss": 1.0, "tokens_per_s": 100.0},
    ]
    with caplog.at_level(logging.INFO, logger="mtft"):
        sink.write(rows)
    assert "step 1  loss 1.000  100 tok/s  w [0.50 0.30 0.20]" in caplog.text


# --- a real run with every logger ---------------------------------------------------------------


class ConnectionTrap:
    """A local TCP listener that counts connections: wandb and proxies are pointed at it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def logged_run(run_mtft, tmp_path_factory):
    """A one-job multirun with wandb (offline) + TensorBoard, a fake API key in the env, network trapped."""
    tmp = tmp_path_factory.mktemp("loggers")
    sweep = tmp / "sweep"
    trap = ConnectionTrap()
    env = {
        "WANDB_API_KEY": FAKE_KEY,
        "WANDB_NOTES": CANARY,  # wandb reads it into the run: proof the child got this environment
        "WANDB_BASE_URL": trap.url,
        "HTTP_PROXY": trap.url,
        "HTTPS_PROXY": trap.url,
        "http_proxy": trap.url,
        "https_proxy": trap.url,
        "NO_PROXY": "",
        "no_proxy": "",
        "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb-data"),
    }
    proc = run_mtft(
        "train",
        "-m",
        "logger=all",
        "logger.wandb.mode=offline",
        "logger.wandb.project=mtft-test",
        "balancer=coba",
        "balancer.warmup_steps=1",
        "balancer.update_interval=1",  # a probe every step: CoBa's series from step 1 on
        "balancer.history_length=3",
        "seed=1",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        f"+hydra.job.env_set.HF_TOKEN={FAKE_KEY}",  # a secret on the command line, as W&B records it
        f"+hydra.job.env_set.MTFT_CANARY={CANARY}",  # and a harmless value that it must record
        env=env,
    )
    trap.close()
    return sweep / "0", sweep, proc, trap


@pytest.mark.slow
def test_wandb_offline_run_holds_the_per_task_series(logged_run):
    run_dir, sweep, _, _ = logged_run
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    history: dict[int, dict[str, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            values = {k: float(v) for k, v in items.items() if not k.startswith("_")}
            history.setdefault(record.history.step.num, {}).update(values)
    assert sorted(history) == [0, 1, 2, 3, 4]

    rows = read_metrics(run_dir)
    for row in rows:  # every number in metrics.jsonl is in the wandb run, under its series name
        for name, value in row_series(row).items():
            assert history[row["step"]][name] == pytest.approx(value), (row["step"], name)
    for task in TASKS:
        assert f"val/{task}/loss" in history[0] and f"val/{task}/loss" in history[4]
        assert f"weight/{task}" in history[3] and f"coba/rcs/{task}" in history[3]
    assert "train/loss" in history[1] and "train/lr" in history[1]

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "mtft-test" and run.run_group == str(sweep)
    assert run.job_type == "coba" and list(run.tags) == ["balancer=coba", "data=codetasks"]
    assert run.display_name == "coba seed=1"
    config = {item.key: item.value_json for item in run.config.update}
    assert '"history_length":3' in config["balancer"] and config["seed"] == "1"


@pytest.mark.slow
def test_nothing_touches_the_network(logged_run):
    run_dir, _, proc, trap = logged_run
    assert trap.connections == 0
    assert "offline" in proc.stderr and "wandb sync" in proc.stderr


@pytest.mark.slow
def test_api_key_is_never_written_or_printed(logged_run):
    run_dir, sweep, proc, _ = logged_run
    files = [p for p in sweep.rglob("*") if p.is_file()]
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert any("tfevents" in p.name for p in files)
    # The controls: the child had the environment with the key, and W&B recorded its command line
    # (the canary override), so a key in either would be found below.
    (run,) = [r.run for r in read_wandb_records(wandb_file) if r.WhichOneof("record_type") == "run"]
    assert run.notes == CANARY
    assert f"MTFT_CANARY={CANARY}".encode() in wandb_file.read_bytes()
    assert b"HF_TOKEN=<redacted>" in wandb_file.read_bytes()
    leaked = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert FAKE_KEY not in proc.stdout and FAKE_KEY not in proc.stderr


@pytest.mark.slow
def test_tensorboard_events_hold_the_per_task_series(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = logged_run[0]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for task in TASKS:
        assert {f"train/{task}/loss", f"val/{task}/loss", f"weight/{task}", f"coba/acs/{task}"} <= tags
    val = {
        r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "val" and r["task"] == TASKS[0]
    }
    logged = {e.step: e.value for e in events.Scalars(f"val/{TASKS[0]}/loss")}
    assert logged == pytest.approx(val)
    assert [e.step for e in events.Scalars(f"weight/{TASKS[1]}")] == [1, 2, 3, 4]


def test_wandb_sink_is_not_started_when_disabled(tmp_path):
    from mtft.recipe.builders import build_sinks

    cfg = TrainConfig(logger=LoggerConfig(progress=False))
    sinks = build_sinks(cfg, tmp_path, TASKS)
    assert [type(s).__name__ for s in sinks] == ["JsonlSink", "ConsoleSink"]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "tensorboard").exists()


# --- sink state: each sink rewinds itself to a checkpoint -------------------------------------------


def _rows(step: int) -> list[dict]:
    return [{"step": step, "split": "train", "task": "all", "loss": float(step), "tokens_per_s": 1.0}]


def test_jsonl_sink_rewinds_to_its_offset(tmp_path):
    from mtft.loggers.jsonl import JsonlSink

    path = tmp_path / "metrics.jsonl"
    first = JsonlSink(path)
    first.write(_rows(1))
    state = first.state_dict()
    first.write(_rows(2))  # written after the checkpoint: to be replayed
    first.close()

    resumed = JsonlSink(path)
    resumed.load_state_dict(state)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # cut back at load, before any write
    resumed.write(_rows(2))
    assert resumed.state_dict()["offset"] == path.stat().st_size
    resumed.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_jsonl_sink_not_restored_starts_its_file_afresh(tmp_path):
    """An attempt that died before its first checkpoint leaves rows that a fresh start replays."""
    from mtft.loggers.jsonl import JsonlSink

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "split": "val", "task": "all", "loss": 1.0}\n')
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    assert sink.state_dict() == {"offset": 0}
    sink.write(_rows(1))
    sink.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_tracker_keys_sink_states_by_kind(tmp_path):
    from mtft.loggers.base import Tracker
    from mtft.loggers.jsonl import JsonlSink

    console = ConsoleSink(TASKS, max_steps=4, progress=False)
    tracker = Tracker([JsonlSink(tmp_path / "metrics.jsonl"), console])
    tracker.log(_rows(1))
    state = tracker.state_dict()
    assert state == {"JsonlSink": {"offset": (tmp_path / "metrics.jsonl").stat().st_size}, "ConsoleSink": {}}
    tracker.log(_rows(2))
    tracker.close()
    Tracker([JsonlSink(tmp_path / "metrics.jsonl"), console]).load_state_dict(state)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    with pytest.raises(ValueError, match="one sink of each kind"):
        Tracker([console, console])


def _scalar_steps(log_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_tensorboard_sink_purges_the_steps_it_replays(tmp_path):
    from mtft.loggers.config import TensorboardConfig
    from mtft.loggers.tensorboard import TensorboardSink

    ctx = RunContext(run_dir=tmp_path)
    first = TensorboardSink(TensorboardConfig(enabled=True), ctx)
    for step in (1, 2):
        first.write(_rows(step))
    state = first.state_dict()
    assert state == {"step": 2}
    first.write(_rows(3))
    first.close()

    resumed = TensorboardSink(TensorboardConfig(enabled=True), ctx)
    resumed.load_state_dict(state)
    for step in (3, 4):
        resumed.write(_rows(step))
    resumed.close()
    assert _scalar_steps(tmp_path / "tensorboard", "train/loss") == [1, 2, 3, 4]


def test_wandb_sink_continues_the_checkpoints_run(tmp_path, monkeypatch):
    import wandb

    from mtft.loggers.wandb import WandbSink

    started: list[dict] = []

    class FakeRun:
        id, step = "ckpt1234", 3

        def log(self, values, step):
            started[-1].setdefault("logged", []).append(step)

        def finish(self):
            pass

    def init(**kwargs):
        started.append(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    sink = WandbSink(WandbConfig(enabled=True, mode="offline"), RunContext(run_dir=tmp_path))
    assert started == []  # the W&B run starts with the first row, once resume is known
    sink.load_state_dict({"run_id": "ckpt1234"})
    for step in (2, 3):
        sink.write(_rows(step))
    sink.close()
    assert started[0]["id"] == "ckpt1234" and started[0]["resume"] == "allow"
    assert started[0]["logged"] == [3]  # step 2 is already in the W&B run
    assert sink.state_dict() == {"run_id": "ckpt1234"}
