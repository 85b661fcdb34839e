"""reports/index.html: the page a stakeholder opens first. Plain HTML, no scripts, renders offline."""

from __future__ import annotations

import html
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tuneforge.core.paths import STAGE_METRICS, repo_root

STAGES = [  # (report file, title)
    ("00_prepare.html", "Prepare"),
    ("01_data_audit.html", "Data audit"),
    ("02_train.html", "Training"),
    ("03_evaluate.html", "Evaluation"),
    ("04_export_gguf.html", "GGUF export"),
    ("05_drift_report.html", "Drift"),
    ("05_drift_evidently.html", "Drift (Evidently, full)"),
]


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _badge(ok: bool | None, yes: str = "PASS", no: str = "FAIL") -> str:
    if ok is None:
        return '<span class="badge none">not run</span>'
    return f'<span class="badge {"ok" if ok else "bad"}">{yes if ok else no}</span>'


def _revision(root: Path) -> str:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "(not a git checkout)"
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return commit + dirty


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def task_section(task: str, root: Path, primary: str) -> str:
    folder = root / "reports" / task  # the stage reports; their numbers are in metrics/<task>/
    audit, train, ev, ex, dr = (_load(root / "metrics" / task / f"{name}.json") for name in STAGE_METRICS)
    served = ex.get("served_quantization") or "none passed"  # the smallest file the export gate passed
    retrain = dr.get("retrain")
    verdicts = (
        f"<tr><td>Data audit gate</td><td>{_badge(audit.get('gate_passed'))}</td></tr>"
        f"<tr><td>Evaluation gate</td><td>{_badge(ev.get('gate_passed'))}</td></tr>"
        f"<tr><td>GGUF parity gate</td><td>{_badge(ex.get('gate_passed'))}</td></tr>"
        f"<tr><td>Drift</td><td>{_badge(None if retrain is None else not retrain, 'no drift', 'RETRAIN')}"
        f"{''.join(f'<div class=reason>{html.escape(r)}</div>' for r in dr.get('reasons', []))}</td></tr>"
    )
    numbers = [
        ("training records", _fmt(audit.get("train_records"), "{:,}")),
        ("quarantined records", _fmt(audit.get("quarantined"), "{:,}")),
        (f"{primary}: base → tuned", f"{_fmt(ev.get(f'base_{primary}'))} → <b>{_fmt(ev.get(f'tuned_{primary}'))}</b>"),
        ("validation loss: base → tuned", f"{_fmt(train.get('base_eval_loss'))} → {_fmt(train.get('best_eval_loss'))}"),
        ("training", f"{train.get('mode', '–')} on {train.get('device', '–')}, {_fmt(train.get('wall_seconds'), '{:.0f}')} s"),
        (f"GGUF {served} size", _fmt(ex.get(f"{served}_size_mb"), "{:.0f} MB")),
        (f"GGUF {served} generation speed (CPU)", _fmt(ex.get(f"{served}_generation_tokens_per_second"), "{:.0f} tokens/s")),
        (f"GGUF {served} {primary}", _fmt(ex.get(f"{served}_{primary}"))),
        ("drift share (columns drifted)", _fmt(dr.get("drift_share"), "{:.0%}")),
    ]
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in numbers)
    links = "".join(f'<li><a href="{task}/{name}">{title}</a></li>' for name, title in STAGES if (folder / name).exists())
    return (f"<section><h2>{html.escape(task)}</h2><div class=cols><table><caption>Verdicts</caption>{verdicts}</table>"
            f"<table><caption>Headline numbers</caption>{rows}</table><div><b>Stage reports</b><ul>{links}</ul></div></div></section>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0 2em 1em 0}td{border-bottom:1px solid #eee;padding:4px 10px;vertical-align:top}
caption{text-align:left;font-weight:bold;padding:4px 0}.cols{display:flex;flex-wrap:wrap}
.badge{padding:2px 8px;border-radius:8px;font-weight:bold;font-size:90%}.ok{background:#c8f0c8;color:#135313}
.bad{background:#f8c9c9;color:#7a1010}.none{background:#eee;color:#666}.reason{font-size:85%;color:#555;max-width:380px}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:80%}"""


def build_index(root: Path | None = None) -> Path:
    root = root or repo_root()
    params = yaml.safe_load((root / "params.yaml").read_text())
    sections = "".join(task_section(task, root, spec.get("primary_metric", ""))
                       for task, spec in params.get("tasks", {}).items())
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html><html><head><meta charset=utf-8><title>tuneforge report</title><style>{CSS}</style></head><body>"
            f"<h1>tuneforge: fine-tuning report</h1><p>Revision <code>{html.escape(_revision(root))}</code>, built {built}. "
            "Each task below: the gates, the numbers that matter, and the full report of every stage.</p>"
            f"{sections}<h2>Parameters of this run</h2><pre>{html.escape(yaml.safe_dump(params, sort_keys=False))}</pre>"
            "</body></html>")
    out = root / "reports" / "index.html"
    out.write_text(page, encoding="utf-8")
    return out


if __name__ == "__main__":  # the DVC stage's command: python -m tuneforge.report.index
    print(f"wrote {build_index()}")
