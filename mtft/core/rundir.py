"""The run directory's contract, named once: the files a run writes and `mtft report` reads.

.hydra/config.yaml    the composed config (Hydra format)   metrics.jsonl   one row per task per logged step
summary.json          a `Summary`, written when it ends    checkpoints/    step-XXXXXXXX/ (see engine.checkpoint)
model/                the final model (or adapter)         train.log       the console log
run.lock              locked while a run uses the dir (see mtft.launch.claim)
eval.json             `mtft eval` (or trainer.eval_at_end): per-task loss, perplexity, generation metrics
eval_samples.jsonl    prompt, reference and prediction of each evaluated example
samples.jsonl         trainer.sample_interval: answers to fixed validation prompts during training

summary.json, eval.json and the rows of metrics.jsonl are written and read back through the records
here (`Summary`, `EvalResult`, `MetricsRow`), strict JSON through `mtft.core.jsonfile`. Readers keep the
run-dir promise that extra keys are allowed: they ignore (or, for a metrics row, carry) keys they do not
know, and read a null (a non-finite number when written) back as NaN or None.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mtft.core.jsonfile import read_json_object, write_json

HYDRA_DIR = ".hydra"
CONFIG = f"{HYDRA_DIR}/config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MODEL = "model"
LAUNCH_CONFIG = "launch_config.yaml"  # the resolved config a multi-process job's workers read
TRAIN_LOG = "train.log"
LOCK = "run.lock"
EVAL = "eval.json"
EVAL_SAMPLES = "eval_samples.jsonl"
SAMPLES = "samples.jsonl"


def rank_metrics(rank: int) -> str:
    """metrics.jsonl of a rank > 0 (`logger.all_ranks=true`)."""
    return f"metrics.rank{rank}.jsonl"


@dataclass
class RunSetup:
    """What a run trains, in what precision, on which engine and with what batch: logged once at the
    start (the run-start block) and kept in summary.json under `setup`."""

    parameters: int
    trainable: int
    trainable_dtype: str  # of the trainable weights the forward pass uses
    compute_dtype: str
    optimizer_state_dtype: str
    attention: str
    engine: str  # single process, DDP, DeepSpeed ZeRO-<stage>
    world_size: int
    batch_size: int  # sequences (packed rows with `packed`) per micro-batch per rank
    grad_accum: int
    global_batch: int  # sequences per optimizer step: batch_size x grad_accum x world_size
    global_batch_tokens: int  # expected tokens per step, at the mean training length
    global_batch_max_tokens: int  # at data.max_length
    lr: float  # the peak learning rate the schedule reaches
    scheduler: str
    warmup_steps: int
    max_steps: int
    packed: bool = False  # data.packing: batch sizes count packed rows of several examples


@dataclass
class Generation:
    """How eval.json's answers were generated (the `eval.*` settings that change them)."""

    temperature: float
    top_p: float
    seed: int
    max_new_tokens: int


@dataclass
class EvalTask:
    """One task's entry in eval.json; None where it has no value (no tokens, no metrics)."""

    examples: int
    loss: float | None
    perplexity: float | None
    metrics: dict[str, float]  # metric name -> 0-100
    score: float | None  # its first metric

    @classmethod
    def from_dict(cls, data: Any) -> EvalTask:
        data = data if isinstance(data, dict) else {}
        examples = data.get("examples")
        return cls(
            examples=examples if _is_int(examples) else 0,
            loss=_number(data.get("loss")),
            perplexity=_number(data.get("perplexity")),
            metrics=_floats(data.get("metrics")),
            score=_number(data.get("score")),
        )


@dataclass
class EvalResult:
    """eval.json (`mtft eval`, or trainer.eval_at_end, which also keeps it in summary.json under `eval`)."""

    model: str  # what was evaluated: a run dir, a model dir or a Hub id
    max_samples: int | None  # eval.max_samples; None: every validation example
    generation: Generation | None  # None only when read from a file without it
    tasks: dict[str, EvalTask]
    mean_loss: float | None  # over the tasks that have a loss
    mean_score: float | None  # over the tasks that have a score

    def write(self, out_dir: Path) -> Path:
        write_json(out_dir / EVAL, dataclasses.asdict(self))
        return out_dir / EVAL

    @classmethod
    def read(cls, run_dir: Path) -> EvalResult:
        """OSError or ValueError where eval.json cannot be read."""
        return cls.from_dict(read_json_object(run_dir / EVAL))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        tasks = data.get("tasks")
        max_samples = data.get("max_samples")
        return cls(
            model=str(data.get("model", "")),
            max_samples=max_samples if _is_int(max_samples) else None,
            generation=_complete(Generation, data.get("generation")),
            tasks={str(t): EvalTask.from_dict(e) for t, e in tasks.items()}
            if isinstance(tasks, dict)
            else {},
            mean_loss=_number(data.get("mean_loss")),
            mean_score=_number(data.get("mean_score")),
        )


@dataclass
class Summary:
    """summary.json: what a finished run reached, per task, and what it cost."""

    balancer: str
    tasks: list[str]
    steps: int
    seed: int | None  # None only when read from a file without it
    initial_val_loss: dict[str, float]
    final_val_loss: dict[str, float]
    best_val_loss: dict[str, float]
    train_tokens_per_s: float
    wall_s: float
    peak_rss_mb: float
    skipped_steps: int = 0
    peak_gpu_memory_mb: float | None = None  # torch.cuda.max_memory_allocated on this rank's GPU
    stopped_early: bool = False
    setup: RunSetup | None = None
    eval: EvalResult | None = None  # trainer.eval_at_end

    def write(self, run_dir: Path) -> None:
        write_json(run_dir / SUMMARY, dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """The record `write` wrote. Only `tasks`, `steps` and the final and best losses are needed
        (ValueError names those missing): a missing number reads as NaN, a missing name as ""."""
        missing = [k for k in ("tasks", "final_val_loss", "best_val_loss", "steps") if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        seed, evaluation = data.get("seed"), data.get("eval")
        return cls(
            balancer=str(data.get("balancer") or ""),
            tasks=[str(t) for t in data["tasks"]],
            steps=int(data["steps"]),
            seed=seed if _is_int(seed) else None,
            initial_val_loss=_floats(data.get("initial_val_loss")),
            final_val_loss=_floats(data["final_val_loss"]),
            best_val_loss=_floats(data["best_val_loss"]),
            train_tokens_per_s=_float(data.get("train_tokens_per_s")),
            wall_s=_float(data.get("wall_s")),
            peak_rss_mb=_float(data.get("peak_rss_mb")),
            skipped_steps=int(data.get("skipped_steps") or 0),
            peak_gpu_memory_mb=_number(data.get("peak_gpu_memory_mb")),
            stopped_early=bool(data.get("stopped_early", False)),
            setup=_complete(RunSetup, data.get("setup")),
            eval=EvalResult.from_dict(evaluation) if isinstance(evaluation, dict) else None,
        )


@dataclass
class MetricsRow:
    """One line of metrics.jsonl; keys other than the named ones (the balancer's diagnostics,
    `skipped`) ride along in `extra`, written after them in their own order."""

    step: int
    split: str  # "train" or "val"
    task: str  # a task, or "all" for the mixture
    loss: float | None  # None: the task had no tokens in the batch (or a non-finite loss)
    weight: float | None = None  # train rows of a task: the balancer weight applied at that step
    lr: float | None = None  # the `all` train row from here to grad_norm
    tokens: int | None = None
    tokens_per_s: float | None = None
    grad_norm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: step, split, task and loss, the named values the row has, then `extra`."""
        row: dict[str, Any] = {"step": self.step, "split": self.split, "task": self.task, "loss": self.loss}
        row.update({k: v for k in _ROW_OPTIONAL if (v := getattr(self, k)) is not None})
        row.update(self.extra)
        return row

    @classmethod
    def from_dict(cls, data: Any) -> MetricsRow:
        """ValueError where `data` is not a row: an object with an int `step` and str `split` and `task`."""
        if not (
            isinstance(data, dict)
            and isinstance(data.get("step"), int)
            and isinstance(data.get("split"), str)
            and isinstance(data.get("task"), str)
        ):
            raise ValueError("not a metrics row")
        named = {k: _number(data.get(k)) for k in _ROW_OPTIONAL}
        extra = {k: v for k, v in data.items() if k not in _ROW_KEYS}
        return cls(data["step"], data["split"], data["task"], _number(data.get("loss")), **named, extra=extra)


_ROW_OPTIONAL = ("weight", "lr", "tokens", "tokens_per_s", "grad_norm")
_ROW_KEYS = {"step", "split", "task", "loss", *_ROW_OPTIONAL}

_Record = TypeVar("_Record")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> Any:
    """A JSON number as it is; None for null or anything else."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _float(value: Any) -> float:
    """A JSON number as a float; NaN for null (a non-finite number when written) or anything else."""
    number = _number(value)
    return math.nan if number is None else float(number)


def _floats(value: Any) -> dict[str, float]:
    """name -> float (see `_float`); an empty dict for anything but an object."""
    return {str(k): _float(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _complete(cls: type[_Record], value: Any) -> _Record | None:
    """`cls` from the keys of `value` it has fields for; None where `value` lacks a required one."""
    if not isinstance(value, dict):
        return None
    fields = dataclasses.fields(cls)
    if any(f.name not in value for f in fields if f.default is dataclasses.MISSING):
        return None
    return cls(**{f.name: value[f.name] for f in fields if f.name in value})
