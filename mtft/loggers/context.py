"""What a dashboard logger knows about the run besides its metrics: the config and where it sits in a sweep.

Read once from the typed config and Hydra's runtime state, so the sinks themselves stay free of
Hydra. The config a logger publishes never holds secrets: keys that name one (`api_key`, `token`,
`*_secret`, `password`, ...) are dropped, whatever their nesting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import ListConfig

SECRET_KEY = re.compile(
    r"(^|_)(api_?key|secret|password|passwd|credentials?)$|^(token|auth_token|access_token|hf_token)$", re.I
)


# `key=value` inside a string: a command-line override (`+hydra.job.env_set.WANDB_API_KEY=...`) as
# argv, Hydra's recorded overrides and its `override_dirname` hold it.
ASSIGNMENT = re.compile(r"(?P<key>[\w.]+)=(?P<value>[^,\s]*)")


def _masked(text: str) -> str:
    def mask(m: re.Match[str]) -> str:
        return f"{m['key']}=<redacted>" if SECRET_KEY.search(m["key"].rsplit(".", 1)[-1]) else m[0]

    return ASSIGNMENT.sub(mask, text)


def redact(node: Any) -> Any:
    """A copy of a config tree (or a command line) without secrets: entries whose key names one are
    dropped, and the value of a `secret_key=value` inside a string is masked. Choices (enums) become
    plain strings, so yaml.safe_dump and W&B see ordinary values."""
    if isinstance(node, str):
        return _masked(node)
    if isinstance(node, dict):
        return {k: redact(v) for k, v in node.items() if not SECRET_KEY.search(str(k))}
    if isinstance(node, list | tuple):
        return [redact(v) for v in node]
    if isinstance(node, Enum):
        return node.value
    return node


@dataclass
class RunContext:
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)  # resolved, secrets removed
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (data: codetasks, ...)
    sweep_dir: str | None = None  # the multirun's sweep dir; None for a single run
    balancer: str | None = None  # the balancer's name (cfg.balancer.name), whatever the config group


# The Hydra job's place in its sweep, for processes that run without Hydra: the workers of
# `distributed.nproc_per_node=N` get it from their parent (mtft.launch.workers) in this variable.
HYDRA_CONTEXT_ENV = "MTFT_HYDRA_CONTEXT"


def hydra_context() -> dict[str, Any]:
    """`{"choices": {group: option}, "sweep_dir": str | None}` of the Hydra job this process runs
    (or was started by); empty outside Hydra."""
    if not HydraConfig.initialized():
        return json.loads(os.environ.get(HYDRA_CONTEXT_ENV, "{}"))
    hydra_cfg = HydraConfig.get()
    choices = {
        str(k): ",".join(map(str, v)) if isinstance(v, list | tuple | ListConfig) else str(v)
        for k, v in hydra_cfg.runtime.choices.items()
        if v is not None and not str(k).startswith("hydra/")
    }
    sweep_dir = str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return {"choices": choices, "sweep_dir": sweep_dir}


def run_context(cfg: Any, run_dir: Path) -> RunContext:
    """Collect the run's config and its Hydra choices and sweep (none outside Hydra)."""
    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    balancer = (config.get("balancer") or {}).get("name")
    hydra = hydra_context()
    return RunContext(
        run_dir=run_dir,
        config=redact(config),
        choices=hydra.get("choices", {}),
        sweep_dir=hydra.get("sweep_dir"),
        balancer=balancer and str(balancer),
    )
