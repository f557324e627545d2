"""Count aborts at exit ("terminate called without an active exception", SIGABRT) over many
short 2-rank jobs: the tiny model of the tests, torchrun with 2 gloo ranks, 2 steps, a
checkpoint at the end, and one preempted job (SIGUSR1) per ten. Prints one line per job and a
summary; exit status 1 if any job aborted.

    .venv/bin/python scripts/count_exit_aborts.py [--jobs 30] [--async-save]

About 15 s per job on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import dist_helpers as h  # noqa: E402

ABORT_MARKERS = ("terminate called", "Aborted", "core dumped", "SIGABRT")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=30)
    p.add_argument("--async-save", action="store_true")
    a = p.parse_args()
    extra = ["trainer.max_steps=2", f"checkpoint.async_save={str(a.async_save).lower()}"]
    aborts = failures = 0
    with tempfile.TemporaryDirectory(prefix="exit-aborts-") as root:
        for i in range(a.jobs):
            run_dir = Path(root) / f"run{i}"
            t0 = time.perf_counter()
            preempt = i % 10 == 9
            proc = h.start(run_dir, 2, [*extra, "trainer.max_steps=6"] if preempt else extra)
            if preempt:  # SIGUSR1 to both ranks once training runs
                h.wait_for(lambda: h.read_metrics(run_dir), proc=proc, timeout=120)
                for pid in h.rank_pids(proc):
                    os.kill(pid, signal.SIGUSR1)
            rc = h.wait(proc, 300)
            text = h.log_text(proc) + "".join(f.read_text(errors="replace")
                                              for f in (run_dir / "logs").glob("*.log"))
            aborted = any(m in text for m in ABORT_MARKERS) or rc in (-6, 134)
            aborts += aborted
            failures += rc != 0
            print(f"job {i + 1:3d}/{a.jobs}: exit {rc}{' (preempted)' if preempt else ''}"
                  f"{'  ABORT' if aborted else ''}  {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{aborts} abort(s) and {failures} non-zero exit(s) in {a.jobs} 2-rank jobs")
    return 1 if aborts else 0


if __name__ == "__main__":
    sys.exit(main())
