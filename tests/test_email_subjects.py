"""scripts/extract_raw_data.py's email_subject rows: an email that starts a thread becomes (its own words, subject)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("extract_raw_data", ROOT / "scripts" / "extract_raw_data.py")
extract = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extract)

BODY = "The build server will be down on Saturday for a disk upgrade; please commit before Friday night."


def mail(subject: str, body: str = BODY, headers: str = "") -> str:
    return f"From: a@example.com\nSubject: {subject}\n{headers}Content-Type: text/plain\n\n{body}\n"


def test_list_tags_go_and_the_body_keeps_only_the_authors_words():
    body = (f"URL: http://example.com/x\n\n{BODY}\n> quoted text\nOn Monday Bob wrote:\n"
            "-- \nAlice, sysadmin\n")
    assert extract.subject_row(mail("[ILUG] [SAtalk]  Build server downtime", body)) == {
        "prompt": BODY, "completion": "Build server downtime"}


@pytest.mark.parametrize("subject", ["Re: downtime", "RE: [ILUG] downtime", "[ILUG] Re: downtime", "Fwd: downtime",
                                     "fw: downtime", "Downtime (fwd)", "Headlines for 2002-08-30", "[ILUG]",
                                     "x" * 81])
def test_replies_forwards_digests_and_odd_subjects_are_left_out(subject):
    assert extract.subject_row(mail(subject)) is None


def test_forwards_short_bodies_and_long_bodies():
    assert extract.subject_row(mail("News", "---------- Forwarded message ----------\n" + BODY)) is None
    assert extract.subject_row(mail("News", "see http://example.com/a-very-long-link-indeed-and-more")) is None
    long = extract.subject_row(mail("News", " ".join(["word"] * 200)))["prompt"]
    assert len(long) <= extract.SUBJECT_BODY_CHARS and long.endswith("word")


def test_encoded_subjects_are_decoded():
    assert extract.subject_row(mail("=?iso-8859-1?q?Caf=E9_opening?="))["completion"] == "Café opening"
