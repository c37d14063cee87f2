"""`mtft train`: the Hydra application. Data, model and engine libraries wait until a run really
starts, so `--help`, `--cfg job` and config errors need only Hydra and torch (the balancers' schemas)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtft.core.errors import Interrupted, MtftError
from mtft.launch.process_group import join_process_group
from mtft.recipe.config import TrainConfig, conf_dir, register_configs
from mtft.recipe.validate import validate

log = logging.getLogger("mtft")

# Set once the task function runs: an error before it is Hydra's config composition (see mtft.cli).
task_started = False

register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    global task_started
    task_started = True
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        typed: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]  # runs the __post_init__ checks
        validate(typed)  # the cross-section rules, before any data, model or engine is built
        dist = typed.distributed
        # A rank of a launched job (torchrun, deepspeed, srun, submitit) joins its group here, with
        # the configured backend and timeout; a single process joins nothing.
        join_process_group(dist.backend, dist.timeout_min)
        if "RANK" not in os.environ and (dist.nproc_per_node > 1 or dist.nnodes > 1):
            from mtft.launch.workers import launch_workers

            launch_workers(typed, OmegaConf.to_yaml(cfg, resolve=True), run_dir)
        else:
            from mtft.recipe.finetune import train

            train(typed, run_dir)
    except MtftError as e:
        log.error("error: %s", e)
        sys.exit(2)
    except Interrupted as e:
        log.warning(
            "%s. Continue with the same command plus: trainer.resume=auto hydra.run.dir=%s",
            e,
            hydra_cfg.runtime.output_dir,
        )
        sys.exit(Interrupted.exit_code)
