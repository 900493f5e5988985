"""`python -m train`: the Hydra entry point (see conf/train.yaml and train/loop.py)."""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from train.config import register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from train.loop import run

    hc = HydraConfig.get()
    name = hc.job.override_dirname or None
    if name and hc.mode.name == "MULTIRUN":
        name = f"{hc.job.num}:{name}"
    result = run(cfg, hc.runtime.output_dir, run_name=name[:120] if name else None)
    # the objective of a hyper-parameter search: final validation loss (lower is better)
    return float(result.get("validation_loss_end") or float("nan"))


if __name__ == "__main__":
    main()
