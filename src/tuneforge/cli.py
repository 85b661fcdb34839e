"""`tuneforge` command line: the single entry point each DVC stage calls."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuneforge.paths import base_model_dir, repo_root, reports_dir


def to_offline_html(executed: Path, html_file: Path) -> None:
    """HTML without code cells or stderr, renderable with no network (no CDN scripts)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.get("outputs", []) if o.get("name") != "stderr"]
    exporter = HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
        # No CDN references: reports must render on an offline machine.
        mathjax_url="", require_js_url="", jquery_url="", mermaid_js_url="", mermaid_layout_elk_js_url="",
        widget_renderer_url="",
    )
    body, _ = exporter.from_notebook_node(nb)
    html_file.write_text(body, encoding="utf-8")


def run_notebook(name: str, task: str | None) -> int:
    """Execute notebooks/<name>.ipynb with papermill; write the executed copy and its HTML to reports/."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    root = repo_root()
    source = root / "notebooks" / f"{name}.ipynb"
    if not source.exists():
        print(f"error: {source} does not exist", file=sys.stderr)
        return 2
    out_dir = reports_dir(task) if task else root / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{name}.ipynb"
    parameters = {"task": task} if task else {}
    failure = None
    try:
        papermill.execute_notebook(
            str(source), str(executed), parameters=parameters, kernel_name="python3",
            cwd=str(root), progress_bar=False, log_output=True,
        )
    except PapermillExecutionError as err:
        failure = f"{err.ename}: {err.evalue}"
    to_offline_html(executed, out_dir / f"{name}.html")
    if failure:
        print(f"\nstage failed in {source.relative_to(root)} (executed copy: {executed.relative_to(root)}):\n{failure}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="run one stage notebook with papermill and render its report")
    nb.add_argument("name", help="notebook name without .ipynb, e.g. 01_data_audit")
    nb.add_argument("--task", help="task name from params.yaml")
    sub.add_parser("base-model", help="save model.base as safetensors in models/base")
    sub.add_parser("index", help="write reports/index.html, the stakeholder summary of every task")
    sv = sub.add_parser("serve", help="serve a task's GGUF (OpenAI-compatible API), logging every request")
    sv.add_argument("--task", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="loopback by default: nothing is exposed")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--quantization", help="a type from export.quantizations (default: export.gate_quantization)")
    args = parser.parse_args(argv)

    if args.command == "notebook":
        return run_notebook(args.name, args.task)
    if args.command == "base-model":
        from tuneforge.modeling import save_base_model
        from tuneforge.params import load_params

        save_base_model(load_params().model, base_model_dir())
        print(f"saved {base_model_dir()}")
        return 0
    if args.command == "index":
        from tuneforge.index import build_index

        print(f"wrote {build_index()}")
        return 0
    if args.command == "serve":
        from tuneforge.serve import serve

        serve(args.task, args.host, args.port, args.quantization)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
