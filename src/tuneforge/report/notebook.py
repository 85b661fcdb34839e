"""Run a stage notebook with papermill and render the executed copy as offline HTML."""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.core.paths import repo_root, reports_dir


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
            str(source), str(executed), parameters=parameters, kernel_name="python3", cwd=str(root),
            # The cells' prints and progress bars reach the terminal as written (a bar redraws in place; papermill's
            # log_output would put every redraw on a line of its own); the executed copy keeps each cell's
            # streams merged, a progress bar as its final state.
            progress_bar=False, stdout_file=sys.stdout, stderr_file=sys.stderr, coalesce_streams=True,
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
    import argparse

    parser = argparse.ArgumentParser(description="run one stage notebook with papermill and render its report")
    parser.add_argument("name", help="notebook name without .ipynb, e.g. 01_data_audit")
    parser.add_argument("--task", help="task name from params.yaml")
    args = parser.parse_args(argv)
    return run_notebook(args.name, args.task)


if __name__ == "__main__":  # the DVC stages' command: python -m tuneforge.report.notebook NAME --task TASK
    sys.exit(main())
