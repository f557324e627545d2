"""Training entry point: `python -m launch.train +experiment=cpu_demo [overrides]`.

Runs unchanged alone (a world of one) and under torchrun / srun; every rank composes the
same config (Hydra's override grammar) and validates it before touching data or devices.

    python -m launch.train +experiment=cpu_demo --cfg job     # print the resolved config, run nothing
"""

from __future__ import annotations

import os

from launch.cli import entry_point, print_config, split_options
from trainer.config import compose

USAGE = "python -m launch.train +experiment=NAME [key=value ...] [--cfg job]"


def _main(argv: list[str]):
    options, overrides = split_options(argv, {"--cfg": 1, "--help": 0, "-h": 0})
    if "--help" in options or "-h" in options:
        print(f"usage: {USAGE}\nconfig groups: conf/ (model, data/task, optim, parallel, experiment); "
              "schema and defaults: trainer/config.py")
        return None
    cfg = compose(overrides)  # a bad override fails here, before any data or device work
    if "--cfg" in options:
        print_config(cfg)
        return None
    from trainer.train import run

    result = run(cfg, command=command_line(overrides))
    _report(result)
    return result


def command_line(overrides: list[str]) -> str:
    """This run's launch command as the user would type it (recorded in checkpoints, shown in
    model cards)."""
    import shlex

    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    prefix = "python -m launch.train"
    if world > 1:
        prefix = f"torchrun --nnodes={max(world // max(local, 1), 1)} --nproc_per_node={local} -m launch.train"
    return " ".join([prefix, *(shlex.quote(o) for o in overrides)])


def _report(result) -> None:
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


def main(argv: list[str] | None = None):
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
