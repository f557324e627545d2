"""Predictions for a data file from a training checkpoint (for Arena: a Kaggle submission).

    python -m launch.predict checkpoint=RUN_OR_STEP_DIR data.test_path=FILE out=submission.csv [tta=true]
    torchrun --nproc_per_node=N -m launch.predict ...      (rows split over ranks)

Output columns: ``id`` then one probability column per class (the task's output columns:
``winner_model_a,winner_model_b,winner_tie`` for Arena, the class names otherwise), summing to
1. With labelled input it also prints log loss / accuracy / macro F1. ``tta`` (test-time
augmentation, Arena's A/B swap) defaults to true where the task has one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from launch.cli import entry_point, parse_bool, parse_key_values, require
from trainer.errors import ConfigError

USAGE = "python -m launch.predict checkpoint=PATH data.test_path=FILE out=FILE [tta=true|false]"


def _main(argv: list[str]) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own, overrides = parse_key_values(argv, ("checkpoint", "out", "tta"), USAGE)
    require(own, ("checkpoint", "out"), USAGE)
    from trainer.consolidate import open_trained
    from trainer.distributed import destroy_distributed, init_distributed

    trained = open_trained(own["checkpoint"], overrides)
    task, cfg = trained.task, trained.cfg
    if not cfg.data.test_path:
        raise ConfigError("set data.test_path=FILE (a CSV/parquet/JSONL file in the task's schema; labels optional)")
    tta = parse_bool("tta", own["tta"]) if "tta" in own else task.tta_permutation is not None
    info = init_distributed(cfg.trainer.device, cfg.parallel.backend)
    ok = False
    try:
        result = _predict(trained, info, Path(own["out"]), tta)
        ok = True
        return result
    finally:
        destroy_distributed(graceful=ok)


def _predict(trained, info, out: Path, tta: bool) -> dict:
    from trainer.evaluate import write_predictions
    from trainer.metrics import classification_metrics
    from trainer.predict import predict

    task = trained.task
    ids, probs, labels = predict(trained.load_model(info.device), trained.cfg, task, info, split="test", tta=tta)
    result: dict = {"rows": len(ids), "out": str(out), "checkpoint": str(trained.checkpoint), "tta": tta,
                    "columns": ["id", *task.output_columns]}
    if info.is_main:
        write_predictions(out, task, ids, probs)
        print(f"wrote {len(ids)} rows to {out} (checkpoint {trained.checkpoint}, tta={tta})")
        if labels is not None:
            m = classification_metrics(probs, labels, class_names=task.class_names)
            result.update({k: m[k] for k in ("log_loss", "accuracy", "macro_f1")})
            print(f"log_loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}  macro_f1 {m['macro_f1']:.4f}")
    return result


def main(argv: list[str] | None = None) -> dict:
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
