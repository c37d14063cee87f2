"""Merging a run's LoRA adapter into its base model and saving a full model (`mtft export`).

A LoRA run saves only the adapter (PEFT's format) in `RUN_DIR/model`; serving stacks and
`AutoModelForCausalLM.from_pretrained` want one self-contained model. This loads the base model the
adapter names (in its own dtype, unquantized, also for QLoRA adapters), applies the adapter,
folds it into the weights with `merge_and_unload` and writes model + tokenizer with `save_pretrained`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mtft.core.errors import MtftError
from mtft.core.rundir import CONFIG, MODEL
from mtft.models.adapters import quiet_peft
from mtft.models.loading import DTYPES
from mtft.models.saving import save_pretrained

log = logging.getLogger("mtft")


def _run_model_config(run_dir: Path) -> dict[str, Any]:
    """The run's `model` config (revision, trust_remote_code), if the run dir still has it."""
    path = run_dir / CONFIG
    if not path.is_file():
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    return config.get("model") or {}


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "~", ".")) or Path(path).expanduser().exists()


def adapter_dir(run_dir: Path) -> Path:
    """The run's saved adapter, or an error that says why there is nothing to merge."""
    if not run_dir.is_dir():
        raise MtftError(f"run dir not found: {run_dir}")
    model_dir = run_dir / MODEL
    if not model_dir.is_dir():
        raise MtftError(
            f"{run_dir} has no model/ directory: the run has not finished, or ran with "
            "trainer.save_model=false"
        )
    if (model_dir / "adapter_config.json").is_file():
        return model_dir
    if (model_dir / "config.json").is_file():
        raise MtftError(
            f"{model_dir} is already a full model: the run was a full finetune (peft=none), so there is "
            "no adapter to merge. Load it directly with AutoModelForCausalLM.from_pretrained"
        )
    raise MtftError(f"{model_dir} holds neither a PEFT adapter (adapter_config.json) nor a model")


def export(run_dir: Path, out: Path | None = None, base: str | None = None, dtype: str = "auto") -> Path:
    """Write base model + the run's adapter, merged, as a full `save_pretrained` model; return its dir."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = adapter_dir(run_dir)
    out = out if out is not None else run_dir / "merged"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MtftError(f"{out} already exists and is not empty: choose another -o or remove it")
    if dtype not in DTYPES:
        raise MtftError(f"--dtype must be one of {list(DTYPES)}, got '{dtype}'")

    adapter = PeftConfig.from_pretrained(str(model_dir))
    run_model = _run_model_config(run_dir)
    base_path = base or adapter.base_model_name_or_path
    if not base_path:
        raise MtftError(f"{model_dir}/adapter_config.json names no base model: pass --base PATH_OR_HUB_ID")
    if _looks_local(base_path) and not Path(base_path).expanduser().is_dir():
        source = "--base" if base else f"{model_dir}/adapter_config.json"
        raise MtftError(
            f"the base model {base_path} (from {source}) is not there any more: pass "
            "--base PATH_OR_HUB_ID (for the tiny model: rerun any `mtft train` with the same model "
            "config to rebuild it in the cache)"
        )
    revision = None if base else (adapter.revision or run_model.get("revision"))
    trust_remote_code = bool(run_model.get("trust_remote_code", False))

    log.info("loading the base model %s and the adapter %s", base_path, model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=DTYPES[dtype], revision=revision, trust_remote_code=trust_remote_code
    )
    with quiet_peft():
        model = PeftModel.from_pretrained(model, str(model_dir))
    merged = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)

    # Written next to OUT and renamed into place: an interrupted export never looks complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        save_pretrained(merged, tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
