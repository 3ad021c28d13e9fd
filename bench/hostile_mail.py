"""Each pathological mail of issue 10 against a real `parley serve`: how long its webhook took to
answer, and the worst `/healthz` latency while it did (a client polls it back to back).

    python bench/hostile_mail.py [--root CHECKOUT] [--database-url URL] [--only TEXT]

`--root` serves another checkout's `service` package with this environment (e.g. an export of an
older commit, `git archive a9bed53 | tar -x -C /tmp/parley-a9bed53`), for before/after figures.
The database is a fresh SQLite file unless `--database-url` names an empty database (it is
migrated at start). Providers are the fakes of tests/fakes.py on loopback; nothing leaves the
machine. The mails themselves are in tests/email_posts.py (`HOSTILE`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.email_posts import HOSTILE, report, send_hostile, server_env  # noqa: E402
from tests.fakes import FakeProviders  # noqa: E402
from tests.processes import serving, stop  # noqa: E402


def served_package(env: dict[str, str], cwd: Path) -> str:
    """Which `service` the server will import: the check that `--root` took effect."""
    return subprocess.run(
        [sys.executable, "-c", "import service; print(service.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose service to run")
    parser.add_argument("--database-url", help="an empty database (default: a fresh SQLite file)")
    parser.add_argument("--only", default="", help="only the mails whose name contains this")
    args = parser.parse_args()
    mails = [m for m in HOSTILE if args.only in m[0]]
    root = args.root.resolve()
    with tempfile.TemporaryDirectory() as scratch, FakeProviders() as fakes:
        database_url = args.database_url or f"sqlite+aiosqlite:///{scratch}/bench.db"
        env = server_env(database_url, fakes.base_url, PYTHONPATH=str(root))
        env["PATH"] = os.environ.get("PATH", "")
        workdir = Path(scratch)
        print(f"serving {served_package(env, workdir)} on {database_url.split('@')[-1]}")
        with serving(env, workdir) as (port, process):
            figures, probe = send_hostile(f"http://127.0.0.1:{port}", mails)
            stop(process)
    print(report(figures, probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
