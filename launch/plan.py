"""Plan a job before it starts: per-GPU memory, whether it fits, budget fill, FLOPs, FSDP
traffic and a step-time estimate, at the real world size, on a machine without a GPU.

    python -m launch.plan +experiment=gemma2_9b [overrides] [out=plan.json]
    python -m launch.plan +experiment=gemma2_9b_qlora plan.gpu_memory_gb=24
    python -m launch.plan model=gemma2_27b plan.world_size=64

The world size is launcher.nodes x GPUs per node unless plan.world_size is given; the hardware
assumptions are the plan.* keys (trainer/config.py). Method and keys: docs/planner.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from launch.cli import entry_point, parse_key_values
from trainer.config import compose

USAGE = "python -m launch.plan +experiment=NAME [overrides] [out=plan.json]"


def _main(argv: list[str]):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    own, overrides = parse_key_values(argv, ("out",), USAGE)
    from trainer.planner import plan, report

    result = plan(compose(overrides))
    print(report(result))
    if "out" in own:
        Path(own["out"]).write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {own['out']}")
    return result


def main(argv: list[str] | None = None):
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
