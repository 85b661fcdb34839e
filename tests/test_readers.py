"""Every reader on good and bad input: bad rows are rejected with file, line and reason, never raised."""

import json
from pathlib import Path

import pytest

from tuneforge.core.kinds import output_spec
from tuneforge.core.params import SplitSpec, TaskSpec, load_params
from tuneforge.core.readers import Record, Rejected, content_id, read_source
from tuneforge.core.records import normalise
from tuneforge.stages.prepare import prepare, split_of

LABELS = output_spec(kind="label", labels=["spam", "ham"])


def task(reader: str, source: str = "x", **kw) -> TaskSpec:
    output = kw.pop("output", LABELS)
    return TaskSpec(source=source, reader=reader, system_prompt="S", output=output,
                    primary_metric="accuracy" if output.kind == "label" else "micro_f1", **kw)


def read(tmp_path: Path, name: str, content: bytes, spec: TaskSpec):
    path = tmp_path / name
    path.write_bytes(content)
    return list(read_source(path, name, spec))


def rejects(items):
    return [(r.line, r.reason) for r in items if isinstance(r, Rejected)]


def test_chat_jsonl_good_and_bad(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ham"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": "hello"}),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "ham"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "ham"}, {"role": "user", "content": "x"}]}),
        json.dumps([1, 2]),
        "",
    ]
    items = read(tmp_path, "c.jsonl", ("\n".join(lines)).encode() + b"\n\xff\xfe bad bytes\n", task("chat_jsonl"))
    records = [r for r in items if isinstance(r, Record)]
    assert len(records) == 1
    assert records[0].messages[0] == {"role": "system", "content": "S"}  # task system prompt added
    assert records[0].source == "c.jsonl:1"
    got = rejects(items)
    assert [line for line, _ in got] == [2, 3, 4, 5, 6, 8]
    assert "malformed JSON" in got[0][1]
    assert "non-empty list" in got[1][1]
    assert "string content" in got[2][1]
    assert "last message" in got[3][1]
    assert "JSON object" in got[4][1]
    assert "UTF-8" in got[5][1]


def test_alpaca_and_prompt_completion(tmp_path):
    alpaca = [{"instruction": "Classify", "input": "win money", "output": "spam"}, {"instruction": "x"},
              {"instruction": "x", "output": 5}]
    items = read(tmp_path, "a.jsonl", "\n".join(map(json.dumps, alpaca)).encode(), task("alpaca_jsonl"))
    assert items[0].messages[1]["content"] == "Classify\n\nwin money"
    assert rejects(items) == [(2, "missing field 'output'"), (3, "field 'output' must be a string, got int")]

    pc = [{"prompt": "p", "completion": "ham"}, {"prompt": "p"}]
    items = read(tmp_path, "p.jsonl", "\n".join(map(json.dumps, pc)).encode(), task("prompt_completion_jsonl"))
    assert items[0].messages[-1] == {"role": "assistant", "content": "ham"}
    assert rejects(items) == [(2, "missing field 'completion'")]


def test_csv_with_column_mapping(tmp_path):
    spec = task("csv", columns={"input": "text", "output": "label"})
    content = b'text,label\n"hello, there",ham\nbuy now,spam\nonly one column\n'
    items = read(tmp_path, "d.csv", content, spec)
    assert [r.messages[1]["content"] for r in items if isinstance(r, Record)] == ["hello, there", "buy now"]
    assert [(line, reason.split(":")[0]) for line, reason in rejects(items)] == [(4, "wrong number of columns")]
    items = read(tmp_path, "e.csv", b"a,b\n1,2\n", spec)
    assert "lacks column" in rejects(items)[0][1]
    with pytest.raises(ValueError, match="columns"):
        task("csv")


def test_empty_and_missing_files(tmp_path):
    assert rejects(read(tmp_path, "empty.jsonl", b"", task("chat_jsonl"))) == [(0, "file is empty")]
    assert rejects(list(read_source(tmp_path / "nope.jsonl", "nope.jsonl", task("chat_jsonl")))) == [(0, "file not found")]


def test_prepare_quarantines_unknown_labels_duplicate_ids_and_conflicts(tmp_path):
    rows = [
        {"id": "a", "prompt": "one", "completion": "spam"},
        {"id": "a", "prompt": "two", "completion": "ham"},       # duplicated id
        {"id": "b", "prompt": "three", "completion": "Spam"},    # unknown label (case matters)
        {"id": "c", "prompt": "one", "completion": "spam"},      # exact duplicate of line 1: removed, not quarantined
        {"id": "d", "prompt": "one", "completion": "ham"},       # same input, other answer
        {"id": "e", "prompt": "four", "completion": "ham"},
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = prepare(task("prompt_completion_jsonl", source="r.jsonl"), SplitSpec(), tmp_path)
    reasons = {r.line: r.reason for r in out.rejected}
    assert set(reasons) == {2, 3, 5}
    assert reasons[2].startswith("duplicated id 'a'")
    assert reasons[3].startswith("unknown label 'Spam'")
    assert "different answer" in reasons[5]
    assert out.exact_duplicates == 1 and out.kept == 2 and out.raw_count == 6


def test_json_object_answers_are_checked(tmp_path):
    spec = task("prompt_completion_jsonl", source="j.jsonl",
                output=output_spec(kind="json_object", allowed_keys=["City"]))
    rows = [{"prompt": "a", "completion": '{"City": "X"}'}, {"prompt": "b", "completion": "{oops"},
            {"prompt": "c", "completion": '{"Town": "X"}'}, {"prompt": "d", "completion": '{"City": 1}'}]
    (tmp_path / "j.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = prepare(spec, SplitSpec(), tmp_path)
    assert [r.line for r in out.rejected] == [2, 3, 4]
    assert "keys outside" in out.rejected[1].reason


def test_split_is_deterministic_and_groups_normalised_inputs():
    s = SplitSpec(seed=1, validation_fraction=0.2, test_fraction=0.2)
    names = [split_of(f"text {i}", s, 0.0) for i in range(2000)]
    assert names == [split_of(f"text {i}", s, 0.0) for i in range(2000)]
    assert 0.15 < names.count("test") / 2000 < 0.25
    assert content_id([{"role": "user", "content": "x"}]) == content_id([{"role": "user", "content": "x"}])


def test_embedded_sources_parse_completely(repo_root):
    params = load_params(repo_root / "params.yaml")
    address = prepare(params.task("address_json"), params.split, repo_root)
    assert address.raw_count == 1513 and not address.rejected
    first = address.splits["train"][0].messages
    assert first[-1]["content"] == ('{"AddressNumber": "8128", "StreetNamePreDirectional": "S.", '
                                    '"StreetName": "DR MARTIN LUTHER KING JR", "StreetNamePostType": "Drive"}')
    sms = prepare(params.task("sms_spam"), params.split, repo_root)
    assert sms.raw_count == 5574 and not sms.rejected  # pandas.read_csv sees only 4,837
    assert {r.answer for rows in sms.splits.values() for r in rows} == {"spam", "ham"}


def test_params_errors_name_the_setting(tmp_path):
    from tuneforge.core.params import ParamsError

    bad = tmp_path / "params.yaml"
    bad.write_text("tasks:\n  t:\n    source: x\n    reader: nope\n    output: {kind: label, labels: [a]}\n"
                   "    primary_metric: accuracy\n")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert "tasks.t.reader" in str(err.value) and "tasks.t.output" in str(err.value)
    bad.write_text("trian: {max_steps: 3}\ntasks: {}\n")
    with pytest.raises(ParamsError, match="unknown section"):
        load_params(bad)
    with pytest.raises(ValueError, match="not a label metric"):
        TaskSpec(source="x", reader="csv", columns={"input": "a", "output": "b"}, primary_metric="micro_f1",
                 output=LABELS)


def test_unicode_look_alikes_are_one_input_for_splits_and_conflicts(tmp_path):
    """Issue 26 D15: NFC and NFD, fullwidth and zero-width forms of one input were all kept with different labels,
    and NFC and NFD landed in different splits."""
    import unicodedata

    nfc, nfd = "Café au lait at noon", unicodedata.normalize("NFD", "Café au lait at noon")
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in "WIN") + " a prize"
    rows = [{"prompt": nfc, "completion": "ham"}, {"prompt": nfd, "completion": "spam"},        # 1 kept, 2 conflicts
            {"prompt": "WIN a prize", "completion": "spam"}, {"prompt": fullwidth, "completion": "ham"},  # 3, 4
            {"prompt": "free\u200bcall", "completion": "spam"}, {"prompt": "freecall", "completion": "ham"},  # 5, 6
            {"prompt": nfd, "completion": "ham"}]                                               # 7 agrees with 1
    (tmp_path / "u.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = prepare(task("prompt_completion_jsonl", source="u.jsonl"), SplitSpec(), tmp_path)
    reasons = {r.line: r.reason for r in out.rejected}
    assert sorted(reasons) == [2, 4, 6] and all("with a different answer" in reason for reason in reasons.values())
    split_of_line = {r.line: name for name, rows in out.splits.items() for r in rows}
    assert sorted(split_of_line) == [1, 3, 5, 7] and split_of_line[1] == split_of_line[7]
    assert len({normalise(text) for text in ("cafe\u0301 x", "café x", "CAFÉ X", "caf\u200bé x", "ｃａｆé x")}) == 1
