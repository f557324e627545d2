"""Metrics and progress: metrics.jsonl + optional wandb (rank 0), and the progress bar.

metrics_logger.py  MetricsLogger: the JSON-lines file and the wandb run behind one API
wandb_run.py       start / finish a wandb run (finish waits until it is on disk)
wandb_log.py       the one reader of wandb's offline transaction log (also used by the tests)
records.py         values made JSON-safe, secrets redacted
progress.py        the rank-0, terminal-only progress bar
"""

from .metrics_logger import METRICS_FILE, MetricsLogger
from .progress import progress
from .records import REDACTED, redact, to_jsonable

__all__ = ["METRICS_FILE", "REDACTED", "MetricsLogger", "progress", "redact", "to_jsonable"]
