"""What the model reads of an email (issue 15): the person's new text, all of it, and nothing
quoted. Pure tests: strings in, text out, plus the labelled corpus in fixtures/email_text/."""

from __future__ import annotations

import time

import pytest

from service.channels.sendgrid.text import MAX_TEXT_CHARS, html_to_text, latest_reply, new_text
from tests.email_corpus import Case, cases, judge, normalised

CORPUS = cases()
KNOWN_MISSES = {
    # The person's own earlier message sits unmarked between two unmarked copies of Parley's
    # replies, introduced by a bare "I wrote:": nothing in the text says it is history.
    "own_two_earlier_replies",
}


def _read(case: Case) -> str:
    return new_text(case.plain, case.html, case.own, subject=case.subject)


# --- the corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=pytest.mark.xfail(strict=True, reason="known miss"))
        if c.name in KNOWN_MISSES
        else pytest.param(c, id=c.name)
        for c in CORPUS
    ],
)
def test_corpus_case_reads_exactly_the_expected_text(case: Case) -> None:
    assert normalised(_read(case)) == normalised(case.expected)


def test_corpus_scores_95_percent_exact_and_leaks_no_plain_reply() -> None:
    verdicts = [(case, judge(case, _read(case))) for case in CORPUS]
    exact = sum(verdict.exact for _, verdict in verdicts)
    leaked_plain = [case.name for case, v in verdicts if v.leaked and case.label == "plain_reply"]
    print(f"corpus: {exact}/{len(CORPUS)} exact")
    assert len(CORPUS) >= 80
    assert exact >= 0.95 * len(CORPUS)
    assert leaked_plain == []


LANGUAGES = ["fr", "de", "es", "it", "nl", "pt", "sv", "da", "no", "pl", "ru", "ja", "vi"]
CLIENTS = ["gmail", "apple_mail", "outlook", "thunderbird", "yahoo", "protonmail", "android"]


@pytest.mark.parametrize("group", [f"language-{lang}" for lang in LANGUAGES])
def test_every_configured_language_is_supported(group: str) -> None:
    mine = [case for case in CORPUS if case.label == group]
    assert mine, f"no corpus case for {group}"
    assert [c.name for c in mine if not judge(c, _read(c)).exact] == []


@pytest.mark.parametrize("group", [f"client-{client}" for client in CLIENTS])
def test_every_client_format_is_read(group: str) -> None:
    mine = [case for case in CORPUS if case.label == group]
    assert mine, f"no corpus case for {group}"
    assert [c.name for c in mine if not judge(c, _read(c)).exact] == []


# --- one test per failure class of issue 15 -----------------------------------------------


def test_a_reply_written_below_the_quote_is_kept() -> None:
    text = "Hi,\n\nOn Mon, 6 May 2024 at 10:00, Bob <bob@example.com> wrote:\n> Lunch?\n\nYes, 1pm."
    assert latest_reply(text) == "Hi,\n\nYes, 1pm."


def test_inline_answers_between_quoted_lines_are_kept() -> None:
    text = "> Which day?\n\nFriday\n\n> How many?\n\nFour\n\n> Parking?\n\nNo, we walk."
    assert latest_reply(text) == "Friday\n\nFour\n\nNo, we walk."


def test_a_sign_off_sentence_does_not_cut_what_follows() -> None:
    text = "Hi,\n\nThanks, that fixed the login.\n\nHow do I change my email address?"
    quote = "\n\nOn Tue, Oct 1, 2024 at 3:12 PM Parley <help@parley.example> wrote:\n> Reset it."
    assert latest_reply(text + quote) == text


def test_a_sign_off_block_at_the_end_is_the_signature() -> None:
    assert latest_reply("Please call me back.\n\nBest regards,\nAnna Berg\n+46 70 000 00") == (
        "Please call me back."
    )


def test_a_dash_list_is_the_persons_words() -> None:
    text = "Two questions:\n- Is breakfast included?\n- Can we check in early?"
    assert latest_reply(text) == text
    assert latest_reply("- yes please\n- and a taxi") == "- yes please\n- and a taxi"


def test_a_dash_name_at_the_end_is_the_signature() -> None:
    assert latest_reply("See you then.\n\n-Abhishek Kona") == "See you then."


def test_a_forwarded_message_is_kept_and_marked() -> None:
    text = (
        "FYI, summarise please\n\n---------- Forwarded message ---------\n"
        "From: Bob <bob@example.com>\nSubject: Q3\n\nRevenue is up 12%."
    )
    assert latest_reply(text) == (
        "FYI, summarise please\n\n[forwarded message]\n"
        "From: Bob <bob@example.com>\nSubject: Q3\n\nRevenue is up 12%."
    )


def test_an_outlook_forward_is_told_by_its_subject() -> None:
    text = "Read this\n\nFrom: Ann <ann@example.com>\nSent: Monday\nSubject: Lease\n\nRent +4%."
    assert "Rent +4%." in new_text(text, None, subject="FW: Lease")
    assert new_text(text, None, subject="RE: Lease") == "Read this"


def test_a_weak_header_counts_only_above_a_quote() -> None:
    text = "My teacher wrote:\nthe essay is due on Monday."
    assert latest_reply(text) == text
    assert latest_reply("Agreed.\n\nBob wrote:\n> Shall we?") == "Agreed."


@pytest.mark.parametrize(
    "header",
    [
        "On Mon, May 6, 2024 at 10:00 AM Bob <bob@example.com> wrote:",
        "Le lun. 6 mai 2024 à 10:00, Bob <bob@example.com> a écrit :",
        "Am Mo., 6. Mai 2024 um 10:00 Uhr schrieb Bob <bob@example.com>:",
        "El lun, 6 may 2024 a las 10:00, Bob (<bob@example.com>) escribió:",
        "Il giorno lun 6 mag 2024 alle ore 10:00 Bob <bob@example.com> ha scritto:",
        "Op 6 mei 2024 om 10:00 schreef Bob <bob@example.com>:",
        "Em seg., 6 de mai. de 2024 às 10:00, Bob <bob@example.com> escreveu:",
        "Den 6 maj 2024 kl. 10:00 skrev Bob <bob@example.com>:",
        "man. 6. mai 2024 kl. 10:00 skrev Bob <bob@example.com>:",
        "pon., 6 maj 2024 o 10:00 Bob <bob@example.com> napisał(a):",
        "пн, 6 мая 2024 г. в 10:00, Bob <bob@example.com>:",
        "6 мая 2024 г. 10:00 пользователь Bob <bob@example.com> написал:",
        "2024年5月6日(月) 10:00 Bob <bob@example.com>:",
        "Vào Th 2, 6 thg 5, 2024 vào lúc 10:00 Bob <bob@example.com> đã viết:",
        "2014-10-17 11:28 GMT+03:00 Bob <bob@example.com>:",
        "---- Bob wrote ----",
        "-----Original Message-----",
        "-------- Oprindelig meddelelse --------",
    ],
)
def test_each_quote_header_form_ends_the_new_text(header: str) -> None:
    quoted = latest_reply(f"New words.\n\n{header}\n> old words\n")
    unmarked = latest_reply(f"New words.\n\n{header}\n\nold words\n")
    assert (quoted, unmarked) == ("New words.", "New words.")


@pytest.mark.parametrize(
    "block",
    [
        "From: Bob <bob@example.com>\nSent: Monday, May 6, 2024 10:00\nTo: Ann\nSubject: Hi",
        "De : Bob <bob@example.com>\nEnvoyé : lundi 6 mai 2024 10:00\nÀ : Ann\nObjet : Hi",
        "Von: Bob <bob@example.com>\nGesendet: Montag, 6. Mai 2024 10:00\nAn: Ann\nBetreff: Hi",
        "Fra: Bob <bob@example.com>\nSendt: 6. maj 2024 10:00\nTil: Ann\nEmne: Hi",
        "Od: Bob <bob@example.com>\nWysłano: poniedziałek, 6 maja 2024 10:00\nDo: Ann\nTemat: Hi",
        "От: Bob <bob@example.com>\nОтправлено: 6 мая 2024 г. 10:00\nКому: Ann\nТема: Hi",
        "差出人: Bob <bob@example.com>\n送信日時: 2024年5月6日 10:00\n宛先: Ann\n件名: Hi",
        "Từ: Bob <bob@example.com>\nĐã gửi: Thứ Hai, 6 tháng 5, 2024\nĐến: Ann\nChủ đề: Hi",
    ],
)
def test_each_outlook_header_block_ends_the_new_text(block: str) -> None:
    assert latest_reply(f"New words.\n\n________________\n{block}\n\nold words") == "New words."


def test_a_header_on_the_same_line_as_the_reply() -> None:
    text = "Sounds good On Wed, Apr 4, 2012 at 3:59 PM, bob@example.com wrote:\n> Lunch?"
    assert latest_reply(text) == "Sounds good"


def test_a_header_wrapped_over_two_lines() -> None:
    text = "Obrigado.\n\nEm 10 de julho de 2017 às 16:32, John Doe (\n"
    text += "contact@stripe.com) escreveu:\n\nOi"
    assert latest_reply(text) == "Obrigado."


def test_mobile_footers_go_only_at_the_end() -> None:
    assert latest_reply("Yes.\n\nSent from my iPhone") == "Yes."
    assert latest_reply("Envoyé de mon iPhone is in every mail, can I hide it?") == (
        "Envoyé de mon iPhone is in every mail, can I hide it?"
    )


def test_a_signature_after_the_delimiter_goes() -> None:
    assert latest_reply("Cancel order #4411 please.\n\n-- \nJo\nhttps://jo.example") == (
        "Cancel order #4411 please."
    )


# --- structure before heuristics (HTML) -----------------------------------------------------

GMAIL_QUOTE = (
    '<div class="gmail_quote"><div class="gmail_attr">On Mon, Bob &lt;b@x.com&gt; wrote:</div>'
    '<blockquote class="gmail_quote">Lunch on Friday?</blockquote></div>'
)


def test_html_quotes_are_removed_in_the_tree_whatever_the_language() -> None:
    html = '<div dir="ltr">Tak, piątek.</div>' + GMAIL_QUOTE.replace("wrote", "napisał(a)")
    assert new_text(None, html) == "Tak, piątek."


def test_html_structure_wins_over_the_plain_part() -> None:
    plain = "Yes!\n\nBob wrote earlier that lunch is at 1.\nLunch on Friday?"
    assert new_text(plain, '<div dir="ltr">Yes!</div>' + GMAIL_QUOTE) == "Yes!"


def test_html_without_structure_falls_back_to_the_text_rules() -> None:
    html = "<p>Yes!</p><p>On Mon, May 6, 2024 at 10:00 AM Bob &lt;b@x.com&gt; wrote:</p><p>Hi</p>"
    assert new_text(None, html) == "Yes!"
    assert new_text("Plain yes!", "<p>Yes!</p>") == "Plain yes!"  # the sender's own text


def test_outlook_html_cuts_everything_after_its_header_block() -> None:
    html = (
        "<div>Fine by me.</div><div id='appendonsend'></div><hr>"
        "<div id='divRplyFwdMsg'><b>From:</b> Bob</div><div>old text</div>"
    )
    assert new_text(None, html) == "Fine by me."


def test_a_gmail_html_forward_is_kept() -> None:
    html = (
        "<div>Read this</div><div class='gmail_quote'><div class='gmail_attr'>"
        "---------- Forwarded message ---------<br>From: Bob</div><div>Rent +4%.</div></div>"
    )
    assert new_text(None, html) == "Read this\n\n[forwarded message]\nFrom: Bob\nRent +4%."


def test_a_mail_that_is_all_quote_is_read_rather_than_dropped() -> None:
    assert new_text(None, "<blockquote>Is the offer still open?</blockquote>") == (
        "Is the offer still open?"
    )
    assert new_text(None, "<!-- nothing -->") == ""


def test_html_to_text_renders_everything() -> None:
    text = html_to_text("<p>Hi &amp; bye</p><blockquote>quoted</blockquote><script>x()</script>")
    assert text == "Hi & bye\n\nquoted"


# --- Parley's own earlier replies ----------------------------------------------------------

OWN = (
    "The Prado is open from 10:00 to 20:00 Monday to Saturday, and from 10:00 to 19:00 on "
    "Sundays. Would you like me to suggest a route from your hotel?"
)


def test_an_unmarked_copy_of_parleys_reply_is_removed_wherever_it_sits() -> None:
    top = f"Great, thanks.\n\n{OWN}"
    bottom = f"{OWN}\n\nGreat, thanks."
    rewrapped = "> The Prado is open from 10:00 to 20:00 Monday to\n> Saturday, and from 10:00"
    rewrapped += " to 19:00 on\nSundays.\n\nGreat, thanks."
    for text in (top, bottom, rewrapped):
        assert new_text(text, None, [OWN]) == "Great, thanks.", text


def test_inline_answers_to_parleys_reply_keep_every_line() -> None:
    text = (
        "The Prado is open from 10:00 to 20:00 Monday to Saturday, and from 10:00 to 19:00 on\n"
        "Sundays.\nGood, Sunday then.\nWould you like me to suggest a route from your hotel?\n"
        "Yes"
    )
    assert new_text(text, None, [OWN]) == "Good, Sunday then.\n\nYes"


def test_a_person_quoting_a_few_words_of_parley_keeps_the_sentence() -> None:
    text = "You said it is open from 10:00 to 20:00 Monday to Saturday; on holidays too?"
    assert new_text(text, None, [OWN]) == text


# --- bounds (SPEC §9, issue 10) -------------------------------------------------------------

PATHOLOGICAL_TEXT = {
    "'On ' x 5,000 on one line": "Hi\n" + "On " * 5000,
    "'On' + 20,000 spaces": "Hi\nOn" + " " * 20000,
    "100 KB of On…wrote-like lines": "Hi\n"
    + "On Mon, Jan 1, 2024 at 10:00 AM Bob Smith <bob@example.com> wrot\n" * 1600,
    "100 KB of headers with nothing quoted": "Hi\n"
    + "On Mon, Jan 1, 2024 at 10:00 AM Bob <bob@example.com> wrote:\n\n" * 1600,
    "10,000 '>' levels": "Hi\n" + ">" * 10000 + " x\nanswer",
    "1 MB of one line": "x" * 1_000_000,
    "1 MB of 'On ' ending in wrote:": "On " * 333_333 + "wrote:",
    "20,000 'From:' lines": "Hi\n" + "From: a\n" * 20000,
    "20,000 wrapped-header starts": "Hi\n" + "On Mon 1 <\n" * 20000,
}
PATHOLOGICAL_HTML = {
    "HTML nested 10,000 levels": "<div>" * 10000 + "x" + "</div>" * 10000,
    "HTML 10,000 nested blockquotes": "<blockquote>" * 10000 + "x" + "</blockquote>" * 10000,
    "HTML 60,000 sibling blockquotes": "<p>hi</p>" + "<blockquote>q</blockquote>" * 60000,
    "HTML 110,000 inline elements": "<p>" + "<b>x</b> " * 110000 + "</p>",
    "HTML 30,000 links": "<a href='https://x.example/'>l</a>" * 30000,
}
BOUND_SECONDS = 2.0  # generous for a loaded 2-core machine; measured figures are printed


@pytest.mark.parametrize("name", list(PATHOLOGICAL_TEXT) + list(PATHOLOGICAL_HTML))
def test_hostile_input_finishes_quickly_and_bounded(name: str) -> None:
    plain, html = PATHOLOGICAL_TEXT.get(name), PATHOLOGICAL_HTML.get(name)
    own = ["the museum opens at nine " * 2000] * 30 if plain else ()
    started = time.perf_counter()
    text = new_text(plain, html, own)
    elapsed = time.perf_counter() - started
    print(f"{name}: {elapsed * 1000:.1f} ms, {len(text)} chars")
    assert elapsed < BOUND_SECONDS
    assert len(text) <= MAX_TEXT_CHARS + len("[forwarded message]\n\n")
