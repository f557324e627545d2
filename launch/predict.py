"""Predictions for a data file from one checkpoint or an ensemble of teachers.

    python -m launch.predict checkpoint=RUN_OR_STEP_DIR data.test_path=FILE out=submission.csv [tta=true]
    python -m launch.predict checkpoint=[RUN_A,RUN_B] [weights=[2,1]] data.test_path=POOL.csv \\
        out=pseudo.csv out_format=train                                      (pseudo-labels)
    torchrun --nproc_per_node=N -m launch.predict ...      (rows split over ranks)

``checkpoint`` is a run directory, a checkpoint directory or an export, or a list of them in
brackets: the teachers are loaded one at a time and their probabilities averaged (``weights``,
one per teacher, normalised; equal by default). ``tta`` (test-time augmentation, Arena's A/B
swap) defaults to true where the task has one, and applies per teacher.

``out_format``:
  submission (default)  ``id`` then one probability column per class (the task's output
                        columns: ``winner_model_a,winner_model_b,winner_tie`` for Arena).
  train                 the input rows unchanged (every column, the input's format) with the
                        probabilities in the label columns: a ``data.train_path`` (stage 2).
  teacher               the same, labels kept, probabilities in ``teacher_<class>`` columns
                        (``loss.kind=distill``).
With labelled input it also prints log loss / accuracy / macro F1 (each teacher's and the
ensemble's).
"""

from __future__ import annotations

import logging
from pathlib import Path

from launch.cli import entry_point, parse_bool, parse_key_values, require
from trainer.errors import ConfigError

USAGE = ("python -m launch.predict checkpoint=PATH|[PATH,PATH,...] data.test_path=FILE out=FILE [tta=true|false] "
         "[weights=[W,W,...]] [out_format=submission|train|teacher]")


def parse_list(name: str, value: str) -> list[str]:
    """``[a,b]``, ``a,b`` or ``a`` -> a list of non-empty items."""
    text = value.strip()
    if text.startswith("[") != text.endswith("]"):
        raise ConfigError(f"{name}={value!r}: unbalanced brackets; write {name}=[A,B]")
    items = [t.strip().strip("'\"") for t in text.strip("[]").split(",")]
    if not all(items):
        raise ConfigError(f"{name}={value!r}: an empty item; write {name}=[A,B]")
    return items


def _floats(name: str, value: str) -> list[float]:
    try:
        return [float(x) for x in parse_list(name, value)]
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected numbers, e.g. {name}=[2,1]") from None


def _main(argv: list[str]) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own, overrides = parse_key_values(argv, ("checkpoint", "out", "tta", "weights", "out_format"), USAGE)
    require(own, ("checkpoint", "out"), USAGE)
    from trainer.consolidate import open_trained
    from trainer.distributed import destroy_distributed, init_distributed
    from trainer.pseudo_label import OUT_FORMATS, probability_columns

    out_format = own.get("out_format", "submission")
    if out_format not in OUT_FORMATS:
        raise ConfigError(f"out_format={out_format!r}: expected one of {list(OUT_FORMATS)}")
    paths = parse_list("checkpoint", own["checkpoint"])
    weights = _floats("weights", own["weights"]) if "weights" in own else None
    teachers = [open_trained(p, overrides) for p in paths]  # configs and verified files; no weights loaded yet
    task, cfg = teachers[0].task, teachers[0].cfg
    if not cfg.data.test_path:
        raise ConfigError("set data.test_path=FILE (a CSV/parquet/JSONL file in the task's schema; labels optional)")
    if out_format != "submission":
        probability_columns(task, out_format)  # refuse before any compute
    tta = parse_bool("tta", own["tta"]) if "tta" in own else None
    info = init_distributed(cfg.trainer.device, cfg.parallel.backend)
    ok = False
    try:
        result = _predict(teachers, info, Path(own["out"]), tta, weights, out_format)
        ok = True
        return result
    finally:
        destroy_distributed(graceful=ok)


def _predict(teachers, info, out: Path, tta: bool | None, weights, out_format: str) -> dict:
    from trainer.evaluate import write_predictions
    from trainer.metrics import classification_metrics
    from trainer.predict import predict_ensemble
    from trainer.pseudo_label import write_with_probabilities

    pred = predict_ensemble(teachers, info, weights=weights, tta=tta)
    task = pred.task
    tta = task.tta_permutation is not None if tta is None else tta
    one = len(teachers) == 1
    result: dict = {"rows": len(pred.row_ids), "out": str(out), "tta": tta, "out_format": out_format,
                    "checkpoint": pred.checkpoints[0] if one else pred.checkpoints, "weights": pred.weights}
    if not info.is_main:
        return result
    src = Path(pred.cfg.data.test_path)
    if out_format == "submission":
        write_predictions(out, task, pred.row_ids, pred.probs)
        result["columns"] = ["id", *task.output_columns]
    else:
        result.update(write_with_probabilities(src, out, task, pred.row_ids, pred.probs, out_format))
    print(f"wrote {len(pred.row_ids)} rows to {out} ({out_format}; "
          f"{'checkpoint ' + pred.checkpoints[0] if one else f'{len(teachers)} teachers'}, tta={tta})")
    if pred.labels is not None:
        if not one:
            result["teachers"] = []
            for path, probs in zip(pred.checkpoints, pred.teacher_probs):
                m = classification_metrics(probs, pred.labels, class_names=task.class_names)
                result["teachers"].append({"checkpoint": path, "log_loss": m["log_loss"], "accuracy": m["accuracy"]})
                print(f"  teacher {path}: log_loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}")
        m = classification_metrics(pred.probs, pred.labels, class_names=task.class_names)
        result.update({k: m[k] for k in ("log_loss", "accuracy", "macro_f1")})
        print(f"{'' if one else 'ensemble: '}log_loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}  "
              f"macro_f1 {m['macro_f1']:.4f}")
    return result


def main(argv: list[str] | None = None) -> dict:
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
