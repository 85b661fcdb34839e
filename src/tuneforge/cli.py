"""`tuneforge` command line for people; DVC stages call the modules behind these commands (`python -m ...`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="run one stage notebook with papermill and render its report")
    nb.add_argument("name", help="notebook name without .ipynb, e.g. 01_data_audit")
    nb.add_argument("--task", help="task name from params.yaml")
    sub.add_parser("base-model", help="save model.base as safetensors in models/base")
    pr = sub.add_parser("profile", help="write a settings profile (profiles/<name>.yaml, e.g. gpu or cpu) into params.yaml")
    pr.add_argument("name")
    sub.add_parser("base-gguf", help="write models/base as a GGUF (export.base_quantization), the file task adapters run over")
    sub.add_parser("index", help="write reports/index.html, the stakeholder summary of every task, and each "
                                 "task's model card in reports/model_cards/")
    sw = sub.add_parser("sweep", help="run params.yaml's sweep as DVC experiments; write reports/sweep.html")
    sw.add_argument("--report-only", action="store_true", help="rewrite the page from experiments already run")
    sw.add_argument("--dry-run", action="store_true", help="print the dvc exp run commands; run nothing")
    sw.add_argument("--jobs", type=int, default=1, help="experiments at a time (1 on a small CPU)")
    sv = sub.add_parser("serve", help="serve the tasks' GGUF files (OpenAI-compatible API), logging every request")
    sv.add_argument("--task", help="serve this task's merged file; without it every task runs from one process over "
                    "the base GGUF with its adapter, chosen by the request's 'model' field")
    sv.add_argument("--host", default="127.0.0.1", help="loopback by default: nothing is exposed")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--quantization", help="with --task: a type from export.quantizations (default: the smallest file "
                    "that passed the export gate)")
    sv.add_argument("--api-key", help="clients must send 'Authorization: Bearer <key>'; required unless --host is "
                    "loopback. Prefer $TUNEFORGE_API_KEY: a command line is visible to every user of the machine")
    args = parser.parse_args(argv)

    if args.command == "notebook":
        from tuneforge.report.notebook import run_notebook

        return run_notebook(args.name, args.task)
    if args.command == "base-model":
        from tuneforge.stages.base_model import main as save_base

        save_base()
        return 0
    if args.command == "profile":
        from tuneforge.core.params import apply_profile

        changes = apply_profile(args.name)
        print("\n".join(changes) if changes else f"params.yaml already matches profile {args.name}")
        return 0
    if args.command == "base-gguf":
        from tuneforge.stages.base_gguf import main as save_base_gguf

        save_base_gguf()
        return 0
    if args.command == "index":
        from tuneforge.report.index import build_index

        index = build_index()
        print(f"wrote {index} and the model cards in {index.parent / 'model_cards'}")
        return 0
    if args.command == "sweep":
        from tuneforge.sweep import main as sweep

        return sweep(report_only=args.report_only, dry_run=args.dry_run, jobs=args.jobs)
    if args.command == "serve":
        from tuneforge.core.params import ParamsError
        from tuneforge.serve import ServeError, serve

        try:
            serve(args.task, args.host, args.port, args.quantization, args.api_key)
        except (ServeError, ParamsError) as err:
            print(f"tuneforge serve: {err}", file=sys.stderr)
            return 2
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
