"""Where metrics go besides metrics.jsonl: console progress, W&B, TensorBoard."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtft.core.schema import Choice, choice


class WandbMode(Choice):
    online = "online"
    offline = "offline"  # local files only; `wandb sync` later
    disabled = "disabled"


@dataclass
class WandbConfig:
    """Weights & Biases: the same series as metrics.jsonl, one W&B run per job."""

    enabled: bool = False
    # online | offline | disabled; null = wandb's own default (WANDB_MODE, `wandb offline`, else online).
    mode: WandbMode | None = None
    project: str = "mtft"
    entity: str | None = None  # your W&B user or team; null = your default entity
    name: str | None = None  # null: "<balancer> seed=<seed>", e.g. "coba seed=1"
    group: str | None = None  # null: the multirun sweep dir, so a sweep's runs sit together
    job_type: str | None = None  # null: the balancer's name
    tags: list[str] = field(default_factory=list)  # added to balancer=<name> and data=<choice>
    notes: str | None = None

    def __post_init__(self) -> None:
        if self.mode is not None:
            self.mode = choice("logger.wandb.mode", WandbMode, self.mode)


@dataclass
class TensorboardConfig:
    """TensorBoard event files: the same series as metrics.jsonl."""

    enabled: bool = False
    log_dir: str | None = None  # null: <run dir>/tensorboard


@dataclass
class LoggerConfig:
    """Where metrics go besides the always-written metrics.jsonl; several sinks can be on at once."""

    progress: bool = True  # live progress bar on the console
    # Debugging distributed runs: ranks > 0 also write their rows to metrics.rank<r>.jsonl.
    all_ranks: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
