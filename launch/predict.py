"""Write a Kaggle submission from a training checkpoint.

    python -m launch.predict checkpoint=RUN_OR_STEP_DIR data.test_path=FILE out=submission.csv [tta=true]
    torchrun --nproc_per_node=N -m launch.predict ...      (rows split over ranks)

Output columns: id,winner_model_a,winner_model_b,winner_tie (probabilities summing to 1).
With labelled input (winner_* columns present) it also prints log loss / accuracy / macro F1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from trainer.consolidate import checkpoint_config, load_model_from_checkpoint, parse_cli, resolve_checkpoint
from trainer.distributed import destroy_distributed, init_distributed
from trainer.predict import predict, score, write_submission


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own, overrides = parse_cli(sys.argv[1:] if argv is None else argv, ("checkpoint", "out", "tta"))
    if "checkpoint" not in own or "out" not in own:
        raise SystemExit("usage: python -m launch.predict checkpoint=PATH data.test_path=FILE out=FILE [tta=true]")
    tta = own.get("tta", "true").lower() in ("1", "true", "yes")
    ckpt = resolve_checkpoint(own["checkpoint"])
    cfg = checkpoint_config(ckpt, overrides)
    if not cfg.data.test_path:
        raise SystemExit("set data.test_path=FILE (a Kaggle-schema CSV/parquet/JSONL; winner columns optional)")
    info = init_distributed(cfg.trainer.device if cfg.trainer.device != "auto" else "auto", cfg.parallel.backend)
    model = load_model_from_checkpoint(ckpt, cfg, device=info.device)
    ids, probs, labels = predict(model, cfg, info, split="test", tta=tta)
    result: dict = {"rows": len(ids), "out": own["out"], "checkpoint": str(ckpt), "tta": tta}
    if info.is_main:
        write_submission(Path(own["out"]), ids, probs)
        print(f"wrote {len(ids)} rows to {own['out']} (checkpoint {ckpt}, tta={tta})")
        if labels is not None:
            m = score(probs, labels)
            result.update({k: m[k] for k in ("log_loss", "accuracy", "macro_f1")})
            print(f"log_loss {m['log_loss']:.4f}  accuracy {m['accuracy']:.4f}  macro_f1 {m['macro_f1']:.4f}")
    destroy_distributed()
    return result


if __name__ == "__main__":
    main()
