"""What `mtft eval` and `mtft generate` run: a run dir, a model dir or a Hub id, with the config
that goes with it, and the model loaded from it (a LoRA adapter on its base model).

A run dir brings its own config (.hydra/config.yaml): data, template, dtype. A model dir inside a run
dir (`RUN/merged` from `mtft export`) uses that run's config; any other model dir or Hub id uses the
default config plus the overrides given (e.g. `data=mytasks model.prompt_format=chat`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtft.core.errors import MtftError
from mtft.core.rundir import CONFIG, MODEL
from mtft.recipe.config import TrainConfig, compose, load_config
from mtft.recipe.validate import validate

if TYPE_CHECKING:
    import torch

ADAPTER, FULL = "adapter_config.json", "config.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


@dataclass
class Target:
    cfg: TrainConfig  # with model.name_or_path pointing at the model to evaluate
    label: str  # how results name it
    run_dir: Path | None  # where eval.json goes by default (None: not a run)


def is_model_dir(path: Path) -> bool:
    return (path / FULL).is_file() or (path / ADAPTER).is_file()


def resolve_target(target: str, overrides: list[str], config_dir: Path | None = None) -> Target:
    """The config to evaluate `target` with; an MtftError says what is missing."""
    path = Path(target).expanduser()
    run_dir = None
    if path.is_dir() and (path / CONFIG).is_file():
        run_dir, model = path, path / MODEL
        if not is_model_dir(model):
            raise MtftError(
                f"{path} has no model to evaluate ({MODEL}/ with {FULL} or {ADAPTER}): the run has not "
                "finished, or ran with trainer.save_model=false"
            )
        cfg = load_config(path / CONFIG, overrides)
    elif path.is_dir():
        if not is_model_dir(path):
            raise MtftError(
                f"{path} is neither a run dir (with {CONFIG}) nor a model dir (with {FULL} or {ADAPTER})"
            )
        model = path
        parent_run = path.parent / CONFIG
        cfg = load_config(parent_run, overrides) if parent_run.is_file() else compose(overrides, config_dir)
    elif path.exists() or target.startswith(("/", ".", "~")) or not HUB_ID.match(target):
        raise MtftError(f"{target}: not a run dir, a model dir or a Hub model id")
    else:
        model, cfg = None, compose(overrides, config_dir)
    cfg.model.name_or_path = str(model) if model is not None else target
    cfg.model.build = None
    if model is None or not (model / ADAPTER).is_file():
        cfg.peft = None  # a full model (a merged export of a LoRA run too) loads as it is
    validate(cfg)
    return Target(cfg, str(path if model is not None else target), run_dir)


def load_eval_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """`model.name_or_path` in eval mode on `device`; an adapter dir is applied to the base it names.
    A model that cannot be loaded is an MtftError naming it."""
    path = cfg.model.name_or_path
    assert path is not None
    try:
        model = _load(path, cfg)
    except OSError as e:
        raise MtftError(f"could not load {path}: {str(e).splitlines()[0]}") from None
    if not getattr(model, "is_quantized", False):
        model = model.to(device)
    return model.eval()


def _load(path: str, cfg: TrainConfig) -> torch.nn.Module:
    """(The model stack is imported here, so that a bad target or option fails before it loads.)"""
    from mtft.models.adapters import quiet_peft
    from mtft.models.loading import load_model

    if not (Path(path) / ADAPTER).is_file():
        return load_model(path, cfg.model)
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    if not base or (base.startswith(("/", "~", ".")) and not Path(base).expanduser().is_dir()):
        raise MtftError(
            f"the base model of the adapter {path} ({base or 'not named'}) is not there: for the tiny "
            "model, rerun any `mtft train` with the same model config to rebuild it in the cache"
        )
    model = load_model(base, cfg.model, cfg.peft)
    with quiet_peft():
        return PeftModel.from_pretrained(model, path)
