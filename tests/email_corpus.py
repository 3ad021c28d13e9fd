"""The labelled email-text corpus in tests/fixtures/email_text/ and how an output is judged.

One file per case: `label:` and `source:` (and optionally `subject:`) lines, then sections
opened by `=== plain`, `=== html`, `=== own` (one per earlier Parley reply; repeatable) and
`=== expected` (the text the model should read). Pure: reading files is all it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CORPUS = Path(__file__).parent / "fixtures" / "email_text"


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    source: str
    expected: str
    plain: str | None = None
    html: str | None = None
    own: tuple[str, ...] = ()
    subject: str = ""
    tags: tuple[str, ...] = field(default=())


def load(path: Path) -> Case:
    meta: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    own: list[str] = []
    current: list[str] | None = None
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("=== "):
            name = line[4:].strip()
            current = []
            if name == "own":
                own.append("")  # filled below
                sections[f"own{len(own)}"] = current
            else:
                sections[name] = current
        elif current is None:
            key, _, value = line.partition(":")
            if key.strip():
                meta[key.strip()] = value.strip()
        else:
            current.append(line)

    def text(name: str) -> str | None:
        lines = sections.get(name)
        return "\n".join(lines).rstrip("\n") if lines is not None else None

    return Case(
        name=path.stem,
        label=meta["label"],
        source=meta.get("source", ""),
        subject=meta.get("subject", ""),
        expected=text("expected") or "",
        plain=text("plain"),
        html=text("html"),
        own=tuple(text(f"own{k}") or "" for k in range(1, len(own) + 1)),
    )


def cases() -> list[Case]:
    return [load(path) for path in sorted(CORPUS.glob("*.txt"))]


def normalised(text: str) -> str:
    """Trailing spaces off, blank runs as one blank line, outer blank lines off."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def words(text: str) -> set[str]:
    cleaned = "".join(c if c.isalnum() else " " for c in text.lower())
    return set(cleaned.split()) - {"forwarded", "message"}  # the "[forwarded message]" mark


@dataclass(frozen=True)
class Verdict:
    exact: bool
    leaked: bool  # the output has words the expected text has not: history, header, signature
    lost: bool  # the output misses words of the expected text: the person's words


def judge(case: Case, output: str) -> Verdict:
    got, want = normalised(output), normalised(case.expected)
    extra = words(got) - words(want)
    missing = words(want) - words(got)
    return Verdict(exact=got == want, leaked=bool(extra), lost=bool(missing))
