"""One owner per table: only the queue manager names the job table, and the reply steps hold
no SQL of their own (they call the store and the queue)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(SERVICE.parent)): ast.parse(path.read_text(encoding="utf-8"))
        for path in sorted(SERVICE.rglob("*.py"))
    }


def _imports(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_only_the_queue_manager_touches_the_job_table() -> None:
    users = sorted(
        name
        for name, tree in _modules().items()
        if "service.models.ReplyJob" in _imports(tree) and name != "service/models.py"
    )
    assert users == ["service/queue/manager.py"]


def test_the_reply_steps_import_no_sqlalchemy() -> None:
    offenders = {
        name: sorted(i for i in _imports(tree) if i.startswith("sqlalchemy"))
        for name, tree in _modules().items()
        if name.startswith("service/reply/")
    }
    assert offenders and all(found == [] for found in offenders.values()), offenders
