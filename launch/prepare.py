"""Build the tokenized data caches ahead of a job: python -m launch.prepare +experiment=NAME [overrides]"""

from __future__ import annotations

import logging

from launch.cli import entry_point
from trainer.config import compose


def _main(argv: list[str]) -> dict:
    cfg = compose(argv)
    logging.basicConfig(level=cfg.logging.level, format="%(levelname)s %(name)s: %(message)s")
    from trainer.datasets import prepare_splits, resolve_task

    task = resolve_task(cfg.data)
    out = prepare_splits(cfg.data, task)
    for name, ds in out.items():
        print(f"{name}: {len(ds)} rows, {int(ds.lengths.sum())} tokens")
    return out


def main(argv: list[str] | None = None) -> dict:
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
