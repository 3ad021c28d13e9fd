"""The webhook fuzz suite (tests/acceptance/test_fuzz_webhooks.py), with a long random budget.

CI runs the same properties with a small fixed budget; this is the long run, for a session
that changed parsing or storage:

    python bench/fuzz_webhooks.py --examples 2000            # SQLite
    TEST_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/fuzz \
        python bench/fuzz_webhooks.py

Prints pytest's summary and hypothesis' statistics (examples run, time per example).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per property")
    parser.add_argument("-k", default="", help="pytest -k expression to pick properties")
    args = parser.parse_args()
    env = {**os.environ, "PARLEY_FUZZ_EXAMPLES": str(args.examples), "PARLEY_FUZZ_RANDOM": "1"}
    command = [sys.executable, "-m", "pytest", "tests/acceptance/test_fuzz_webhooks.py", "-q",
               "--hypothesis-show-statistics", "-p", "no:cacheprovider"]  # fmt: skip
    if args.k:
        command += ["-k", args.k]
    started = time.monotonic()
    status = subprocess.call(command, cwd=ROOT, env=env)
    print(f"fuzz run: {args.examples} examples per property, {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
