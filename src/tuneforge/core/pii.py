"""Personal data in text (e-mail addresses, phone numbers, card numbers): the one detector the audit counts with
and the request log redacts with.

Every pattern runs in time linear in the text: the audit scans whole records before any gate, and the server scans
every request it logs.
"""

from __future__ import annotations

import re

PII_PATTERNS = {
    # A match may start only where a run of local-part characters starts (not after one of them): the engine then
    # tries each run once, where a free start retried every position of "a.a.a..." against the whole run (quadratic).
    # The local part starts at its first word character, as "\b" placed it before.
    "email": re.compile(r"(?<![\w.+-])[.+-]*(\w[\w.+-]*@[\w-]+\.[\w.-]+\b)"),
    "phone": re.compile(r"(?<!\w)(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)|\d{3,5})[\s.-]?\d{3}[\s.-]?\d{3,4}(?!\w)"),
    "card_number": re.compile(r"(?<!\d)(?:\d[ -]?){13,19}(?!\d)"),
}
# What redact() writes in place of each finding.
REDACTED = {"email": "[email]", "phone": "[phone]", "card_number": "[card]"}


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _spans(kind: str, text: str):
    """(start, end) of each finding of one kind: card-like numbers only when their digits pass the Luhn check."""
    for match in PII_PATTERNS[kind].finditer(text):
        found = match.group(match.lastindex or 0).rstrip(" -")  # a card match may swallow the separator after it
        if kind != "card_number" or _luhn_ok(re.sub(r"\D", "", found)):
            start = match.start(match.lastindex or 0)
            yield start, start + len(found)


def pii_findings(text: str) -> dict[str, list[str]]:
    """kind -> the texts found, for the kinds found."""
    found = {kind: [text[a:b] for a, b in _spans(kind, text)] for kind in PII_PATTERNS}
    return {kind: hits for kind, hits in found.items() if hits}


def redact(text: str) -> str:
    """text with each finding replaced by its kind's placeholder ([email], [phone], [card]); cards go first, so a
    card number is not half read as a phone number."""
    for kind in ("card_number", "email", "phone"):
        spans = list(_spans(kind, text))
        for start, end in reversed(spans):
            text = text[:start] + REDACTED[kind] + text[end:]
    return text
