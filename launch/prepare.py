"""Build the tokenized data caches ahead of a job: python -m launch.prepare +experiment=NAME"""
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.config import register_configs
from trainer.data.prepare import prepare_from_config

register_configs()  # typed schema + ${project_root:} resolver, as the trainer does


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    prepare_from_config(OmegaConf.to_container(cfg.data, resolve=True))


if __name__ == "__main__":
    main()
