"""`mtft train`: the Hydra application. Heavy imports wait until a run really starts,
so `--help`, `--cfg job` and config errors answer in about a second."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtft.config import TrainConfig, conf_dir, register_configs
from mtft.errors import Interrupted, MtftError

log = logging.getLogger("mtft")

register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from mtft.recipe import train

    hydra_cfg = HydraConfig.get()
    try:
        typed: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        train(typed, Path(hydra_cfg.runtime.output_dir), hydra_cfg.runtime.choices.get("balancer", "custom"))
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
