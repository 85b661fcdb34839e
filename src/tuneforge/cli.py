"""`tuneforge` command line for people; DVC stages call the modules behind these commands (`python -m ...`)."""

from __future__ import annotations

import argparse
import sys


def run_notebook(args) -> int:
    from tuneforge.report.notebook import run_notebook

    return run_notebook(args.name, args.task)


def base_model(args) -> int:
    from tuneforge.stages.base_model import main as save_base

    save_base()
    return 0


def profile(args) -> int:
    from tuneforge.core.params import apply_profile

    changes = apply_profile(args.name)
    print("\n".join(changes) if changes else f"params.yaml already matches profile {args.name}")
    return 0


def base_gguf(args) -> int:
    from tuneforge.stages.base_gguf import main as save_base_gguf

    save_base_gguf()
    return 0


def index(args) -> int:
    from tuneforge.report.index import build_index

    page = build_index()
    print(f"wrote {page} and the model cards in {page.parent / 'model_cards'}")
    return 0


def sweep(args) -> int:
    from tuneforge.sweep import main as run_sweep

    return run_sweep(report_only=args.report_only, dry_run=args.dry_run, jobs=args.jobs)


def serve(args) -> int:
    from tuneforge.serve import ServeError, serve as run_server

    try:
        run_server(args.task, args.host, args.port, args.quantization, args.api_key, route=not args.no_route)
    except ServeError as err:
        print(f"tuneforge serve: {err}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    """One subcommand a function: each subparser names the function that runs it (set_defaults(run=...))."""
    top = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="run one stage notebook with papermill and render its report")
    nb.add_argument("name", help="notebook name without .ipynb, e.g. 01_data_audit")
    nb.add_argument("--task", help="task name from params.yaml")
    nb.set_defaults(run=run_notebook)
    sub.add_parser("base-model", help="save model.base as safetensors in models/base").set_defaults(run=base_model)
    pr = sub.add_parser("profile", help="write a settings profile (profiles/<name>.yaml, e.g. gpu or cpu) into params.yaml")
    pr.add_argument("name")
    pr.set_defaults(run=profile)
    sub.add_parser("base-gguf", help="write models/base as a GGUF (export.base_quantization), the file task adapters "
                   "run over").set_defaults(run=base_gguf)
    sub.add_parser("index", help="write reports/index.html, the stakeholder summary of every task, and each "
                                 "task's model card in reports/model_cards/").set_defaults(run=index)
    sw = sub.add_parser("sweep", help="run params.yaml's sweep as DVC experiments; write reports/sweep.html")
    sw.add_argument("--report-only", action="store_true", help="rewrite the page from experiments already run")
    sw.add_argument("--dry-run", action="store_true", help="print the dvc exp run commands; run nothing")
    sw.add_argument("--jobs", type=int, default=1, help="experiments at a time (1 on a small CPU)")
    sw.set_defaults(run=sweep)
    sv = sub.add_parser("serve", help="serve the tasks' GGUF files (OpenAI-compatible API), logging every request")
    sv.add_argument("--task", help="serve this task's merged file; without it every task runs from one process over "
                    "the base GGUF with its adapter, chosen by the request's 'model' field")
    sv.add_argument("--host", default="127.0.0.1", help="loopback by default: nothing is exposed")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--quantization", help="with --task: a type from export.quantizations (default: the smallest file "
                    "that passed the export gate)")
    sv.add_argument("--api-key", help="clients must send 'Authorization: Bearer <key>'; required unless --host is "
                    "loopback. Prefer $TUNEFORGE_API_KEY: a command line is visible to every user of the machine")
    sv.add_argument("--no-route", action="store_true", help="the fine-tune answers every request, even where a task "
                    "has a router to its classical model (params' serve.route for every run)")
    sv.set_defaults(run=serve)
    return top


def main(argv: list[str] | None = None) -> int:
    from tuneforge.core.params import ParamsError

    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ParamsError as err:  # a setting to fix, said in one message: no traceback
        print(f"tuneforge {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
