"""What a run is about to do, said once at its start so nothing about it is silent.

- The run-start block: parameters, trainable parameters and their dtype, compute and optimizer-state
  dtypes, attention, engine, world size, the global batch and the learning-rate schedule (also
  written to summary.json as `setup`).
- The learning-rate warning: the embedded demo's defaults (lr 2e-3) are far above what finetuning a
  real model wants, so a model over ~100M parameters trained above the usual range for its method
  gets one warning line naming the range and the experiment that has working settings.
"""

from __future__ import annotations

import yaml

from mtft.core.dist import world_size
from mtft.core.rundir import RunSetup
from mtft.data.batching import Batching
from mtft.engine.backend import Backend, trainable
from mtft.engine.precision import dtype_name, main_dtype
from mtft.recipe.config import TrainConfig, conf_dir

LARGE_MODEL = 100_000_000  # parameters; the embedded demo model has ~1.3M
# Peak learning rates of the published finetuning recipes (the experiments' comments cite them):
# full finetuning 1e-5 to 2e-5 (LLaMA-Factory, Qwen, torchtune, DeepSeek-Coder); LoRA and QLoRA
# 5e-5 (MFTCoder, Qwen2.5-Coder) to 3e-4 (torchtune), 1e-4 to 2e-4 most often (LLaMA-Factory, axolotl).
USUAL_LR = {"full": (5e-6, 5e-5), "lora": (5e-5, 3e-4), "qlora": (5e-5, 3e-4)}
METHOD_NAMES = {"full": "full finetuning", "lora": "LoRA", "qlora": "QLoRA"}


def method(cfg: TrainConfig) -> str:
    return "full" if cfg.peft is None else str(cfg.peft.method)


def suggested_experiment(cfg: TrainConfig) -> str:
    """The experiment with tested settings for this model and method: a shipped model's own
    (`<family>_<method>`, plus `model=<name>` for an instruct variant), else the generic `hf_<method>`."""
    m = method(cfg)
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        if yaml.safe_load(path.read_text()).get("name_or_path") != cfg.model.name_or_path:
            continue
        family = path.stem.removesuffix("_instruct")
        if (conf_dir() / "experiment" / f"{family}_{m}.yaml").is_file():
            return f"experiment={family}_{m}" + (f" model={path.stem}" if path.stem != family else "")
    return f"experiment=hf_{m}"


def lr_warning(cfg: TrainConfig, parameters: int) -> str | None:
    """One line when a model over LARGE_MODEL parameters is trained above its method's usual
    learning rates (None otherwise: the embedded model and every shipped experiment)."""
    m = method(cfg)
    low, high = USUAL_LR[m]
    if parameters <= LARGE_MODEL or cfg.trainer.lr <= high:
        return None
    return (
        f"trainer.lr={cfg.trainer.lr:g} is above the usual range for {METHOD_NAMES[m]} of a "
        f"{parameters / 1e9:.2g}B-parameter model ({low:g} to {high:g}); for tested settings run "
        f"mtft train {suggested_experiment(cfg)} (or set trainer.lr)"
    )


def run_setup(
    cfg: TrainConfig, backend: Backend, counts: tuple[int, int], batching: Batching, lengths: list[int]
) -> RunSetup:
    """The run-start block's values. `counts` (trainable, total) are taken before DeepSpeed
    partitions the weights; `lengths` are the training examples' token counts."""
    module, t = backend.module, cfg.trainer
    engine = backend.describe()
    global_batch = t.batch_size * t.grad_accum * world_size()
    mean_length = batching.row_tokens(lengths)
    attention = getattr(getattr(module, "config", None), "_attn_implementation", None)
    return RunSetup(
        parameters=counts[1],
        trainable=counts[0],
        trainable_dtype=dtype_name(main_dtype(trainable(module))),
        compute_dtype=engine["compute_dtype"],
        optimizer_state_dtype=engine["optimizer_state_dtype"],
        attention=str(attention or "default"),
        engine=engine["engine"],
        world_size=world_size(),
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        global_batch=global_batch,
        global_batch_tokens=round(global_batch * mean_length),
        global_batch_max_tokens=global_batch * cfg.data.max_length,
        lr=t.lr,
        scheduler=str(t.scheduler),
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        packed=batching.packed,
    )


def setup_block(s: RunSetup) -> str:
    """The run-start block as logged: one message of four lines."""
    share = 100.0 * s.trainable / max(s.parameters, 1)
    return "\n".join(
        [
            f"run: {s.parameters:,} parameters, {s.trainable:,} trainable ({share:.2f}%) in {s.trainable_dtype}; "
            f"compute {s.compute_dtype}; optimizer states {s.optimizer_state_dtype}; attention {s.attention}",
            f"  engine: {s.engine}, world size {s.world_size}",
            f"  global batch: {s.batch_size} x {s.grad_accum} accumulation x {s.world_size} rank(s) = "
            f"{s.global_batch} {'packed rows' if s.packed else 'sequences'}, ~{s.global_batch_tokens:,} tokens (at most {s.global_batch_max_tokens:,})",
            f"  lr {s.lr:g} peak, {s.scheduler} schedule, {s.warmup_steps} warm-up steps of {s.max_steps:,}",
        ]
    )
