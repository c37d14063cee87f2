"""The config schema: every bad value fails fast, before anything is built, as one `error:` line."""

from __future__ import annotations

import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtft.core.errors import MtftError
from mtft.recipe.config import TrainConfig, conf_dir, register_configs
from mtft.recipe.validate import validate


def typed(*overrides: str) -> TrainConfig:
    """Compose like `mtft train`, then build and validate the typed config as the app does."""
    register_configs()
    with initialize_config_dir(str(conf_dir().resolve()), version_base=None):
        cfg = compose("train", overrides=list(overrides))
    out: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(out)
    return out


# In process: (override, what the one-line message says). Hydra/OmegaConf errors (types, enums, unknown
# keys) raise their own exceptions; the CLI turns those into the same single line.
BAD = [
    ("trainer.max_steps=0", "trainer.max_steps must be >= 1"),
    ("trainer.batch_size=-1", "trainer.batch_size must be >= 1"),
    ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("trainer.lr=0", "trainer.lr must be a finite number > 0"),
    ("trainer.lr=-1e-3", "trainer.lr"),
    ("trainer.lr=nan", "trainer.lr"),
    ("trainer.lr=inf", "trainer.lr"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
    ("trainer.adam_beta1=1.0", "trainer.adam_beta1 must be in [0, 1)"),
    ("trainer.adam_beta2=-0.5", "trainer.adam_beta2"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps must be >= 0"),
    ("trainer.max_grad_norm=0", "trainer.max_grad_norm"),
    ("trainer.max_grad_norm=nan", "trainer.max_grad_norm"),
    ("trainer.eval_interval=0", "trainer.eval_interval"),
    ("trainer.eval_batches=0", "trainer.eval_batches"),
    ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
    ("trainer.log_interval=0", "trainer.log_interval must be >= 1, got 0"),
    ("trainer.save_interval=0", "trainer.save_interval"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps"),
    ("trainer.early_stopping_patience=0", "trainer.early_stopping_patience"),
    ("trainer.early_stopping_min_delta=-1", "trainer.early_stopping_min_delta"),
    ("data.max_length=1", "data.max_length must be >= 2"),
    ("data.temperature=0", "data.temperature"),
    ("data.temperature=inf", "data.temperature"),
    ("data.group_batches=0", "data.group_batches"),
    ("data.val_percent=100", "data.val_percent"),
    ("+data.tasks.code_completion.val_fraction=1.5", "data.tasks.code_completion.val_fraction"),
    ("+data.tasks.code_completion.max_train_samples=0", "data.tasks.code_completion.max_train_samples"),
    ("model.build.hidden_size=0", "model.build.hidden_size"),
    ("model.build.num_attention_heads=3", "model.build.hidden_size must be a multiple"),
    ("distributed.nproc_per_node=0", "distributed.nproc_per_node"),
    ("distributed.timeout_min=0", "distributed.timeout_min"),
    ("deepspeed=zero2 deepspeed.stage=4", "deepspeed.stage must be 0, 1, 2 or 3"),
    ("deepspeed=zero2 deepspeed.offload_param=true", "offload_param needs deepspeed.stage=3"),
    ("deepspeed=zero1 deepspeed.stage=0 deepspeed.offload_optimizer=true", "offload_optimizer"),
    ("balancer=gradnorm deepspeed=zero2", "balancer gradnorm takes per-task gradients"),
    ("balancer=coba balancer.history_length=1", "balancer.history_length"),
    ("balancer=coba balancer.warmup_steps=-1", "balancer.warmup_steps"),
    ("balancer=coba balancer.tau=nan", "balancer.tau"),
    ("balancer=coba balancer.update_interval=0", "balancer.update_interval"),
    ("balancer=famo balancer.lr=0", "balancer.lr"),
    ("balancer=famo balancer.gamma=-1", "balancer.gamma"),
    ("balancer=famo balancer.eps=0", "balancer.eps"),
    ("balancer=famo +balancer.min_losses={nope:0.5}", "balancer.min_losses names unknown task"),
    ("balancer=gradnorm balancer.alpha=-1", "balancer.alpha"),
    ("balancer=gradnorm balancer.lr=inf", "balancer.lr"),
    ("balancer=gradnorm balancer.shared_params='('", "not a valid regex"),
    ("balancer=uniform +balancer.weights={nope:2.0}", "balancer.weights names unknown task"),
    ("balancer=uniform +balancer.weights={code_completion:0}", "balancer.weights.code_completion"),
    ("peft=lora peft.r=0", "peft.r must be >= 1"),
    ("peft=lora peft.dropout=1.0", "peft.dropout"),
    ("peft=lora peft.target_modules=[]", "peft.target_modules"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(MtftError) as e:
        typed(*overrides.split())
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.precision=bf61",
        "trainer.precision=fp16",
        "trainer.scheduler=cosine_with_min_lr",
        "trainer.max_steps=many",
        "trainer.max_steps=1.5",
        "model.dtype=float8",
        "model.prompt_format=markdown",
        "data.sampling=random",
        "data.truncation=drop",
        "data.source=csv",
        "distributed.backend=mpi",
        "logger.wandb.mode=ofline",
        "trainer.mx_steps=3",
    ],
)
def test_bad_types_and_choices_are_refused_by_composition(override):
    from mtft.core.errors import config_error_message

    with pytest.raises(Exception) as e:
        typed(override)
    message = config_error_message(e.value)
    assert message.startswith(override.split("=")[0]) and "\n" not in message


def test_the_defaults_and_every_balancer_are_valid():
    for name in ("uniform", "coba", "famo", "gradnorm"):
        assert typed(f"balancer={name}").balancer.name == name
    cfg = typed("trainer.precision=bf16", "peft=lora", "deepspeed=zero3_offload")
    assert cfg.trainer.precision == "bf16" and f"{cfg.trainer.precision}" == "bf16"
    assert cfg.peft is not None and cfg.peft.method == "lora" and cfg.deepspeed.offload_param


def test_choices_serialize_as_plain_strings(tmp_path):
    import yaml

    from mtft.loggers.context import run_context

    ctx = run_context(typed("logger=wandb", "logger.wandb.mode=offline"), tmp_path)
    text = yaml.safe_dump(ctx.config)
    assert "precision: fp32" in text and "mode: offline" in text and ctx.balancer == "uniform"


def test_validation_builds_nothing(monkeypatch):
    """The whole config path runs without touching the tokenizer, the model or the data."""
    import mtft.data.mixture
    import mtft.models.loading

    def boom(*args, **kwargs):
        raise AssertionError("built during validation")

    for module, name in [
        (mtft.models.loading, "load_model"),
        (mtft.models.loading, "load_tokenizer"),
        (mtft.data.mixture, "build_mixture"),
    ]:
        monkeypatch.setattr(module, name, boom)
    start = time.perf_counter()
    with pytest.raises(MtftError, match="takes per-task gradients"):
        typed("balancer=gradnorm", "deepspeed=zero2")
    typed("balancer=coba", "peft=lora")
    assert time.perf_counter() - start < 10


# Through the real CLI: exit code exactly 2 and one `error:` line, no traceback (bad values of
# the numeric keys: test_bad_values.py).
CLI_BAD = [
    ("trainer.precision=bf61", "expected one of [fp32, bf16]"),
    ("trainer.precision=fp16 deepspeed=zero2", "expected one of [fp32, bf16]"),
    ("trainer.log_interval=0", "trainer.log_interval must be >= 1, got 0"),
    ("balancer=gradnorm deepspeed=zero2", "balancer gradnorm takes per-task gradients"),
    ("trainer.batch_size=-4", "trainer.batch_size must be >= 1"),
    ("trainer.adam_beta2=1e300", "trainer.adam_beta2"),
    ("data.sampling=random", "data.sampling"),
    ("trainer.mx_steps=3", "Key 'mx_steps' not in 'TrainerConfig'"),
    ("balancer=nope", "Could not find 'balancer/nope' Available options in 'balancer': coba"),
    ("balancer=uniform +balancer.weights={nope:2.0}", "balancer.weights names unknown task"),
    ("peft=lora peft.r=0", "peft.r must be >= 1"),
    ("distributed.nnodes=2", "distributed.nnodes > 1 needs distributed.rdzv_endpoint"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", CLI_BAD, ids=[b[0] for b in CLI_BAD])
def test_cli_config_errors_exit_2_with_one_line(run_mtft, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = run_mtft("train", *overrides.split(" "), f"hydra.run.dir={run_dir}", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_help_lists_no_schema_group(run_mtft):
    proc = run_mtft("train", "--help")
    assert (
        "schema" not in proc.stdout
        and "balancer: coba, coba_reference, coba_tiny, famo, gradnorm, uniform" in proc.stdout
    )
