"""Training entry point: `python -m launch.train +experiment=cpu_demo [overrides]`.

Runs unchanged alone (a world of one) and under torchrun / srun; every rank composes the
same config, validates it before touching data or devices, and trains.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from trainer.config import ConfigError, register_configs, validate

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    from trainer.train import run  # after validation: a bad override fails before any data or device work

    _report(run(cfg))


def _report(result) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    print(f"run directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint}")
    if result.preempted:
        print(f"stopped early at step {result.steps} (preemption/stop request); resubmit to resume")
    m = result.eval_metrics
    if m:
        print(f"eval: log_loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}  macro_f1 {m['macro_f1']:.4f}  "
              f"(n={m['n']})")
    print(f"metrics:       {result.run_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
