"""Stats benchmark: seconds and peak RSS of `kembali stats` (``build_stats``) on a kept shop of a million customers.

    python bench/stats.py                                   # the planning bench's kept shop, both ledger shapes
    python bench/stats.py --database /tmp/shop.db --shapes planned --runs 3

The shop is the SQLite file that ``bench/planning.py --keep /tmp/plan-bench`` keeps (1,000,000 customers,
2,500,000 orders, and the 1.33M ledger rows of its last pass): it is only read, never written. Two ledger shapes:

* ``planned``: the kept ledger as it is: every row planned (or held out) on 2027-02-28, none sent, so every
  exposure is still inside its window at the report's instant (what a shop looks like right after its first pass);
* ``sent``: a copy of the file in ``--work`` (made once, reused after) whose rows were planned from 2026-09-02 to
  2026-11-24 (microseconds and all), due up to two hours either side, 90 % sent 0-89 minutes after they fell due,
  5 % skipped as ordered since, 5 % still planned; the held-out rows stay held out: a real shop's ledger, whose
  windows have closed and whose purchases are matched.

Each run is a fresh process (so the peak RSS, VmHWM, is the report's alone) that builds the report for
``--since 2026-09-01`` at 2026-12-04 12:00 UTC (fixed, so runs compare), with a 7-day window, and prints its
seconds, peak RSS and a digest of the report's JSON (the same digest before and after a change: the same numbers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SINCE = datetime(2026, 9, 1, tzinfo=UTC)
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
SENT_SHAPE = """
UPDATE message SET created_at = strftime('%Y-%m-%d %H:%M:%S', '2026-09-02', '+' || (id % 84) || ' days',
    '+' || ((id * 37) % 86400) || ' seconds') || '.' || printf('%06d', (id * 7919) % 1000000);
UPDATE message SET due_at = strftime('%Y-%m-%d %H:%M:%S', created_at, printf('%+d hours', (id % 5) - 2))
    || substr(created_at, 20);
UPDATE message SET status = 'sent', skip_reason = NULL, last_code = 250,
    sent_at = strftime('%Y-%m-%d %H:%M:%S', max(due_at, created_at), '+' || (id % 90) || ' minutes')
        || '.' || printf('%06d', (id * 104729) % 1000000)
    WHERE coalesce(skip_reason, '') != 'held_out' AND id % 10 != 0;
UPDATE message SET updated_at = coalesce(sent_at, created_at);
UPDATE message SET status = 'planned', sent_at = NULL WHERE coalesce(skip_reason, '') != 'held_out' AND id % 10 = 0;
UPDATE message SET status = 'skipped', skip_reason = 'ordered_since' WHERE status = 'planned' AND id % 20 = 0;
"""


def peak_rss_mb() -> float:
    """This process's VmHWM (getrusage's ru_maxrss would survive fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(path: Path) -> None:
    from worker.adapters import db
    from worker.stats import build_stats

    engine = db.create_engine(f"sqlite:///{path}")
    started = time.perf_counter()
    report = build_stats(engine, since=SINCE, now=NOW, window_days=7)
    seconds = time.perf_counter() - started
    engine.dispose()
    digest = hashlib.sha256(json.dumps(report.as_json(), sort_keys=True).encode()).hexdigest()[:12]
    print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb(), "digest": digest}))


def sent_copy(source: Path, work: Path) -> Path:
    target = work / "stats-sent.db"
    if target.exists():
        return target
    work.mkdir(parents=True, exist_ok=True)
    partial = work / "stats-sent.db.partial"
    print(f"copying {source} to {target} and sending most of its ledger (a minute or two)", flush=True)
    shutil.copyfile(source, partial)
    conn = sqlite3.connect(partial)
    conn.executescript(SENT_SHAPE)
    conn.close()
    partial.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", type=Path, default=Path("/tmp/plan-bench/planning-1000000-2026.db"),
                        help="the kept shop (bench/planning.py --keep DIR), read only")  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/stats-bench"), help="where the sent copy goes")
    parser.add_argument("--shapes", default="planned,sent", help="planned, sent or both (comma separated)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if not args.database.exists():
        sys.exit(f"no shop at {args.database}: keep one with `bench/planning.py --keep DIR --runs 0`")
    for shape in args.shapes.split(","):
        path = args.database if shape == "planned" else sent_copy(args.database, args.work)
        for run in range(1, args.runs + 1):
            done = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                                  check=True)  # fmt: skip
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{shape:8} run {run}: {r['seconds']:6.1f} s, peak RSS {r['rss_mb']:5.0f} MB, "
                  f"report {r['digest']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
