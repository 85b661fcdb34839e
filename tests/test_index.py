"""The stakeholder page and the model cards: their key facts match the metrics JSON, "what changed" compares with
the metrics committed at HEAD, and every page renders offline in headless Chromium.

Runs `tuneforge index` on a temporary git copy of the repository: its committed metrics/<task>/*.json are the
facts; the tests change them the way a new run would.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, dump_dom_offline, git
from tuneforge.core.kinds import output_spec
from tuneforge.report.index import fmt

REMOTE_LOAD = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*?\s(?:src|href)=["']https?://""")


def index(repo: Path) -> str:
    """Run the index stage's command in the copy; the page's text."""
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("TUNEFORGE_ROOT", None)
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "index"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return (repo / "reports" / "index.html").read_text()


def metrics(repo: Path, task: str, name: str) -> dict:
    return json.loads((repo / "metrics" / task / f"{name}.json").read_text())


def write_metrics(repo: Path, task: str, name: str, values: dict) -> None:
    (repo / "metrics" / task / f"{name}.json").write_text(json.dumps(values, indent=2) + "\n")


def tasks(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())["tasks"]


def card(repo: Path, task: str) -> tuple[dict, str]:
    """The model card's YAML header and its Markdown body."""
    text = (repo / "reports" / "model_cards" / task / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert match, "a Hugging Face model card starts with a YAML header between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def section(html: str, task: str) -> str:
    return html.split(f'<section id="{task}">')[1].split("</section>")[0]


def text(html: str) -> str:
    """The visible words of some HTML, whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.fixture()
def repo(tmp_path):
    return copy_repo(tmp_path / "repo")


def test_each_task_leads_with_a_plain_sentence_from_its_metrics(repo):
    page = index(repo)
    for task, spec in tasks(repo).items():
        ev, ex = metrics(repo, task, "eval"), metrics(repo, task, "export")
        served = ex.get("served_quantization") or yaml.safe_load((repo / "params.yaml").read_text())["export"]["quantizations"][0]
        lead = text(section(page, task).split('<p class="lead">')[1].split("</p>")[0])
        plain = output_spec(**spec["output"]).plain_metric  # how often the whole answer is right, or text's chrF
        share = ev[f"tuned_{plain}"]
        if f"routed_{plain}" in ev:  # a routed task leads with the served system, then the fine-tune alone
            assert lead.startswith("As served, ")
            assert fmt(ev[f"routed_{plain}"], plain) in lead and fmt(ev["routed_deferred_share"], "share") in lead, lead
            assert "the fine-tuned model alone " in lead
        else:
            assert lead.startswith("The fine-tuned model ")
        assert fmt(share, plain) in lead, lead
        assert f"{ev['test_rows']} test inputs" in lead
        assert f"{ex[f'{served}_size_mb']:.0f} MB {served} file" in lead
        primary = spec["primary_metric"]
        assert f"{ex[f'{served}_{primary}']:.3f}" in lead and f"{ex[f'hf_{primary}']:.3f}" in lead
        assert ("keeps that quality" in lead) == ex["gate_passed"]


def test_gates_chart_and_params(repo):
    page = index(repo)
    for task, spec in tasks(repo).items():
        part = section(page, task)
        gates = text(part.split("<caption>Gates</caption>")[1].split("</table>")[0])
        for name, stage in (("Data audit", "audit"), ("Evaluation", "eval"), ("GGUF", "export")):
            after = gates.split(name)[1].split()
            verdict = next(w for w in after if w in ("PASS", "FAIL"))
            assert verdict == ("PASS" if metrics(repo, task, stage)["gate_passed"] else "FAIL"), (task, name)
        drift = metrics(repo, task, "drift")
        assert ("RETRAIN" in gates) == drift["retrain"]
        for reason in drift["reasons"]:
            assert reason in text(part)
        chart = part.split("<svg")[1].split("</svg>")[0]
        ev = metrics(repo, task, "eval")
        # One bar per model and metric, its width the value on a 260-pixel scale.
        widths = [float(w) for w in re.findall(r'<rect x="110" y="[\d.]+" width="([\d.]+)"', chart)]
        assert round(ev[f"tuned_{spec['primary_metric']}"] * 260, 1) in widths
        # The baseline's bar exactly when the evaluation scored one.
        assert ("classical baseline" in chart) == (f"baseline_{spec['primary_metric']}" in ev)
    assert "<details>" in page and "Parameters of this run" in page
    params_block = page.split("Parameters of this run")[1]
    assert "learning_rate" in params_block and "<script" not in page


def test_baseline_appears_when_the_evaluation_has_one(repo):
    task, spec = next(iter(tasks(repo).items()))
    primary = spec["primary_metric"]
    ev = metrics(repo, task, "eval")
    write_metrics(repo, task, "eval", {**ev, f"baseline_{primary}": 0.912, "baseline_name": "a word tagger"})
    part = section(index(repo), task)
    chart = part.split("<svg")[1].split("</svg>")[0]
    assert "classical baseline" in chart and "0.912" in chart
    assert f'width="{round(0.912 * 260, 1)}"' in chart
    assert "classical baseline" in text(part.split("What changed")[1])
    _, body = card(repo, task)
    assert "| classical baseline |" in body and "0.912" in body and "a word tagger" in body


def test_what_changed_against_the_committed_metrics(repo):
    task, spec = next(iter(tasks(repo).items()))
    primary = spec["primary_metric"]
    head = git("rev-parse", "--short", "HEAD", cwd=repo).strip()
    part = section(index(repo), task)
    assert f"committed at {head} (HEAD): nothing changed" in text(part)

    ev = metrics(repo, task, "eval")
    before = ev[f"tuned_{primary}"]
    write_metrics(repo, task, "eval", {**ev, f"tuned_{primary}": before + 0.05, "gate_passed": False})
    part = section(index(repo), task)
    table = part.split("What changed")[1].split("</table>")[0]
    row = next(r for r in table.split("<tr>") if f"fine-tuned {('micro-F1' if primary == 'micro_f1' else 'macro-F1')}" in r)
    assert f"{before + 0.05:.3f}" in row and f"{before:.3f}" in row and "+0.050" in row and 'class="num good"' in row
    assert "2 numbers changed" in text(part)
    gates = text(part.split("<caption>Gates</caption>")[1].split("</table>")[0])
    assert "FAIL (was PASS)" in gates
    assert "Not ready to ship: the evaluation gate failed." in text(part)

    git("rm", "-q", "-r", "--cached", "metrics", cwd=repo)  # a repository whose HEAD has no metrics yet
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "no metrics", cwd=repo)
    assert "No metrics committed at" in text(section(index(repo), task))


def test_a_machine_without_git_builds_the_page_and_stamps_no_commit(repo, monkeypatch):
    """Container images (a GPU machine's) may lack git: DVC then runs with core.no_scm, and nothing may call git."""
    no_git = str(Path(sys.executable).parent)  # python, no git
    assert shutil.which("git", path=no_git) is None
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "PATH": no_git}
    env.pop("TUNEFORGE_ROOT", None)
    result = subprocess.run([sys.executable, "-m", "tuneforge.cli", "index"], cwd=repo, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    task = next(iter(tasks(repo)))
    assert "Not a git checkout: nothing to compare with." in text(section((repo / "reports" / "index.html").read_text(), task))

    from tuneforge.core.versions import commit

    monkeypatch.setenv("TUNEFORGE_ROOT", str(repo))
    assert commit() != ""  # with git: HEAD's hash
    monkeypatch.setenv("PATH", no_git)
    assert commit() == ""


def test_model_cards_hold_the_facts_of_the_metrics(repo):
    index(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for task, spec in params["tasks"].items():
        meta, body = card(repo, task)
        ev, ex, au, tr, dr = (metrics(repo, task, n) for n in ("eval", "export", "audit", "train", "drift"))
        primary = spec["primary_metric"]
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
        assert meta["datasets"] == [spec["source"]] and primary in meta["metrics"]
        results = meta["model-index"][0]["results"]
        values = {m["type"]: m["value"] for m in results[0]["metrics"]}
        assert values[primary] == round(ev[f"tuned_{primary}"], 4)
        served = ex.get("served_quantization") or params["export"]["quantizations"][0]
        assert results[1]["metrics"][0]["value"] == round(ex[f"{served}_{primary}"], 4)
        for heading in ("Intended use", "Training data", "Training", "Evaluation", "Quantized files", "Limitations",
                        "Drift status"):
            assert f"\n## {heading}\n" in body, heading
        assert spec["system_prompt"] in body
        assert f"| train | {au['train_records']:,} |" in body and f"{au['raw_records']:,} raw records" in body
        assert f"{fmt(tr['best_eval_loss'])} after" in body
        for q in ["f16", *params["export"]["quantizations"]]:
            assert f"`models/{task}/gguf/model-{q}.gguf`" in body and f"{ex[f'{q}_size_mb']:.0f} MB" in body
        assert ("**Retrain**" in body) == dr["retrain"]
        provenance = (repo / Path(spec["source"]).parent / "LICENSE.md").read_text().splitlines()[-1]
        assert provenance in body  # where the data came from and its licence
        assert f"{ev['test_rows']:,} records" in body.split("## Limitations")[1]


def test_index_and_cards_render_offline_in_chromium(repo, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    page = repo / "reports" / "index.html"
    index(repo)
    links = re.findall(r'href="([^"#]+)"', page.read_text())
    cards = [link for link in links if link.endswith("model_card.html")]
    assert len(cards) == len(tasks(repo))
    for target in [page] + [page.parent / link for link in cards]:
        assert target.exists(), target
        html = target.read_text()
        assert not REMOTE_LOAD.search(html)
        dom = dump_dom_offline(chromium, target, tmp_path / "profile")
        if target == page:
            assert all(f'<section id="{task}">' in dom for task in tasks(repo)) and "<svg" in dom
        else:
            assert "<h2>Evaluation</h2>" in dom and "<table>" in dom
    shot = tmp_path / "index.png"  # kept in this test's tmp dir for a look
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
                    "--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000


def test_the_index_stage_declares_what_it_writes_and_shows():
    from tests.conftest import ROOT
    from tuneforge.report.index import MODEL_CARDS, PARAMS_SHOWN

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["index"]
    assert set(stage["params"]) == set(PARAMS_SHOWN)  # the page shows no setting that could be stale
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]}
    assert outs == {"reports/index.html", str(MODEL_CARDS)}


def test_headline_numbers_show_their_intervals(repo):
    """Every headline number shows the interval its metrics file holds; metrics without intervals (as committed
    before them, and as the other tests use) still render."""
    task, spec = next(iter(tasks(repo).items()))
    primary = spec["primary_metric"]
    plain = "exact_match" if spec["output"]["kind"] == "json_object" else "accuracy"
    ev, ex = metrics(repo, task, "eval"), metrics(repo, task, "export")
    served = ex["served_quantization"]
    write_metrics(repo, task, "eval", {**ev, f"tuned_{primary}": 0.787, f"tuned_{primary}_ci": [0.742, 0.831],
                                       f"base_{primary}_ci": [0.0, 0.01], f"delta_{primary}_ci": [0.73, 0.82],
                                       f"tuned_{plain}": 0.48, f"tuned_{plain}_ci": [0.4, 0.56]})
    write_metrics(repo, task, "export", {**ex, f"{served}_delta": -0.03, f"{served}_delta_ci": [-0.061, 0.0],
                                         "rows": 80, "test_rows": 141})
    part = section(index(repo), task)
    lead = text(part.split('<p class="lead">')[1].split("</p>")[0])
    assert "48% (95% CI 40%–56%)" in lead and "on 80 of the 141 inputs" in lead
    assert "-0.030 against its f16 twin, 95% CI -0.061 to +0.000" in lead
    changed = text(part.split("What changed")[1].split("</table>")[0])
    assert "0.787 (95% CI 0.742–0.831)" in changed and "48% (95% CI 40%–56%)" in changed
    assert f"GGUF {served} against the f16 file -0.030 (95% CI -0.061 to 0.000)" in changed
    gates = text(part.split("<caption>Gates</caption>")[1].split("</table>")[0])
    assert "0.787 (95% CI 0.742–0.831), at least" in gates
    assert "-0.030 (95% CI -0.061 to +0.000) against the f16 file on 80 of the 141 test rows" in gates
    chart = part.split("<svg")[1].split("</svg>")[0]
    assert f'<path d="M{110 + round(0.742 * 260, 1)} ' in chart  # the tuned bar's whisker starts at its low end

    _, body = card(repo, task)
    assert "0.787 (95% CI 0.742–0.831)" in body and "-0.030 (95% CI -0.061 to +0.000)" in body
    assert "48% (95% CI 40%–56%), a bootstrap interval over the test rows" in body.split("## Limitations")[1]
