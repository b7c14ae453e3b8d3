"""Import benchmark: a generated customers CSV of N rows through `kembali import` (in-process).

    python bench/importing.py --rows 1000000

Prints rows/s and the process's peak RSS, the figure behind "memory stays bounded for a file of a million
rows". The file and database are made in a temporary folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.adapters import db
from worker.commands.importing import import_file
from worker.config import settings_from_dict
from worker.demo import generate_customers_csv


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database", help="a database URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv_path = generate_customers_csv(folder / "customers.csv", rows=args.rows, seed=1)
        url = args.database or f"sqlite:///{folder / 'bench.db'}"
        settings = settings_from_dict({"database": {"url": url}}, base_dir=folder)
        engine = db.create_engine(settings.database_url)
        db.upgrade(engine)
        engine.dispose()
        rss_before = peak_rss_mb()
        started = time.perf_counter()
        out = io.StringIO()
        with redirect_stdout(out):
            code = import_file(settings, "customers", csv_path)
        elapsed = time.perf_counter() - started
        print(out.getvalue().strip())
        print(f"rows: {args.rows:,}  exit code: {code}")
        print(f"import: {elapsed:.1f} s, {args.rows / elapsed:,.0f} rows/s")
        print(f"peak RSS: {peak_rss_mb():.0f} MB (before the import: {rss_before:.0f} MB)")


if __name__ == "__main__":
    main()
