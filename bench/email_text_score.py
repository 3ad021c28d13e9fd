"""Score what the model reads of an email, on the labelled corpus in tests/fixtures/email_text/.

    .venv/bin/python bench/email_text_score.py          # the table
    .venv/bin/python bench/email_text_score.py -v       # and every case Parley gets wrong

Per extractor: exact = the output is the expected text (whitespace-normalised); leaked = the
output has words the expected text has not (quoted history, a header or a signature); lost =
the output misses words of the expected text (the person's words). Parley's `new_text` runs on
the plain and HTML parts and its own earlier replies; the libraries get what Parley fed them
before (the plain part, else the HTML rendered by inscriptis) and ignore the earlier replies.
A library that is not installed is left out (`pip install -e '.[bench]'` brings them).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.channels.sendgrid.text import html_to_text, new_text
from tests.email_corpus import Case, Verdict, cases, judge

Extractor = Callable[[Case], str]
LANGUAGES = ["en", "fr", "de", "es", "it", "nl", "pt", "sv"]  # what Parley configured before


def parley(case: Case) -> str:
    return new_text(case.plain, case.html, case.own, subject=case.subject)


def _as_text(case: Case) -> str:
    """What Parley's webhook handed the reply parser before: the plain part, else the HTML."""
    if case.plain and case.plain.strip():
        return case.plain
    return html_to_text(case.html or "")


def _mail_parser_reply() -> Extractor | None:
    try:
        from mailparser_reply import EmailReplyParser
    except ImportError:
        return None
    parser = EmailReplyParser(languages=LANGUAGES)

    def extract(case: Case) -> str:
        text = _as_text(case)
        replies = parser.read(text=text).replies
        latest = replies[0].body.strip() if replies else ""
        return str(latest or text.strip())

    return extract


def _email_reply_parser() -> Extractor | None:
    try:
        from email_reply_parser import EmailReplyParser
    except ImportError:
        return None
    return lambda case: str(EmailReplyParser.parse_reply(_as_text(case)))


def _quotequail() -> Extractor | None:
    try:
        import quotequail
    except ImportError:
        return None

    def extract(case: Case) -> str:
        if not (case.plain and case.plain.strip()) and case.html:
            parts = quotequail.quote_html(case.html)
            shown = "".join(html for is_reply, html in parts if is_reply)
            return html_to_text(shown)
        parts = quotequail.quote(case.plain or "")
        return "\n".join(text for is_reply, text in parts if is_reply)

    return extract


def extractors() -> dict[str, Extractor]:
    found: dict[str, Extractor | None] = {
        "parley new_text": parley,
        "mail-parser-reply (before)": _mail_parser_reply(),
        "email_reply_parser": _email_reply_parser(),
        "quotequail": _quotequail(),
    }
    return {name: extract for name, extract in found.items() if extract is not None}


def _verdict(extract: Extractor, case: Case) -> Verdict:
    try:
        return judge(case, extract(case))
    except Exception:  # noqa: BLE001 - a library that crashes on a case gets it wrong
        return Verdict(exact=False, leaked=True, lost=True)


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    arguments.add_argument("-v", "--verbose", action="store_true", help="show Parley's misses")
    verbose = arguments.parse_args().verbose
    corpus = cases()
    groups = sorted({case.label.split("-")[0] for case in corpus})
    print(f"{len(corpus)} cases; per group: exact/total, leaked, lost")
    header = f"{'extractor':28} {'exact':>11} {'leaked':>7} {'lost':>5} {'ms':>6}  " + " ".join(
        f"{group:>14}" for group in groups
    )
    print(header)
    for name, extract in extractors().items():
        started = time.perf_counter()
        verdicts = [(case, _verdict(extract, case)) for case in corpus]
        elapsed = (time.perf_counter() - started) * 1000
        exact = sum(v.exact for _, v in verdicts)
        cells = []
        for group in groups:
            mine = [v for c, v in verdicts if c.label.split("-")[0] == group]
            cells.append(
                f"{sum(v.exact for v in mine)}/{len(mine)} "
                f"{sum(v.leaked for v in mine)} {sum(v.lost for v in mine)}"
            )
        print(
            f"{name:28} {exact:>4}/{len(corpus)} {100 * exact / len(corpus):3.0f}% "
            f"{sum(v.leaked for _, v in verdicts):>7} {sum(v.lost for _, v in verdicts):>5} "
            f"{elapsed:6.0f}  " + " ".join(f"{cell:>14}" for cell in cells)
        )
        if verbose and name == "parley new_text":
            for case, verdict in verdicts:
                if not verdict.exact:
                    print(f"  MISS {case.name} leaked={verdict.leaked} lost={verdict.lost}")
                    print("    got: " + repr(parley(case)))
                    print("    want:" + repr(case.expected))


if __name__ == "__main__":
    main()
