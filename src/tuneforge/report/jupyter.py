"""JupyterLab for analysts: stage notebooks are saved without outputs, so neither git nor DVC sees a run.

DVC hashes notebooks/*.ipynb on disk (each stage depends on its notebook), so a git filter alone is not enough:
the file itself must stay byte for byte what was committed. Two routes, one definition of "clean"
(nbstripout's strip_output with EXTRA_KEYS):

- `strip_on_save`, a Jupyter server pre-save hook (lab/jupyter_server_config.json names it):
  JupyterLab writes a stage notebook to disk without outputs, execution counts, per-run kernel details or
  view state; the open tab keeps showing the outputs.
- nbstripout as this clone's git filter (`install_git_filter`): a notebook saved by any other editor still
  reaches git clean, with the same keys stripped.

`python -m tuneforge.report.jupyter` (run by scripts/setup.sh) installs both.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

# nbstripout's own defaults (its CLI adds them; its strip_output function does not), then what JupyterLab adds
# on save: the running kernel's language details and the cells' view state. language_info.name and the
# kernelspec stay: papermill and Jupyter need them.
EXTRA_KEYS = (
    "metadata.signature", "metadata.widgets", "cell.metadata.collapsed", "cell.metadata.ExecuteTime",
    "cell.metadata.execution", "cell.metadata.heading_collapsed", "cell.metadata.hidden", "cell.metadata.scrolled",
    "metadata.language_info.codemirror_mode", "metadata.language_info.file_extension",
    "metadata.language_info.mimetype", "metadata.language_info.nbconvert_exporter",
    "metadata.language_info.pygments_lexer", "metadata.language_info.version",
    "cell.metadata.jupyter", "cell.metadata.trusted",
)


def clean_notebook(nb):
    """The notebook as it is stored in notebooks/: no outputs, no execution counts, cell ids kept."""
    from nbstripout import strip_output

    return strip_output(nb, keep_output=False, keep_count=False, keep_id=True, extra_keys=list(EXTRA_KEYS))


def is_stage_notebook(file: Path) -> bool:
    """A notebook directly in the notebooks/ folder of a repository with a dvc.yaml."""
    return file.suffix == ".ipynb" and file.parent.name == "notebooks" and (file.parent.parent / "dvc.yaml").exists()


def strip_on_save(model: dict, path: str, contents_manager, **kwargs) -> None:
    """Jupyter server pre-save hook: a stage notebook is written clean; any other notebook as it is."""
    import nbformat

    if model.get("type") != "notebook" or not model.get("content"):
        return
    if is_stage_notebook(Path(contents_manager.root_dir, path).resolve()):
        model["content"] = clean_notebook(nbformat.from_dict(model["content"]))


def install_git_filter(root: Path, python: str = sys.executable) -> None:
    """nbstripout as the repository's git filter for *.ipynb (.gitattributes names it), keeping cell ids."""
    strip = f"{shlex.quote(python)} -m nbstripout --keep-id"
    for key, value in (("filter.nbstripout.clean", strip), ("filter.nbstripout.smudge", "cat"),
                       ("filter.nbstripout.required", "true"), ("filter.nbstripout.extrakeys", " ".join(EXTRA_KEYS)),
                       ("diff.ipynb.textconv", f"{strip} -t")):
        subprocess.run(["git", "config", key, value], cwd=root, check=True)


def link(target: Path, link: Path) -> None:
    """A symbolic link, so an edit to the repository's file needs no new set-up."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and link.resolve() == target.resolve()):
        link.unlink(missing_ok=True)
        link.symlink_to(target.resolve())


def install(root: Path, prefix: Path = Path(sys.prefix)) -> None:
    """What scripts/setup.sh runs: the repository's lab/ settings linked into the environment, nbstripout as
    this clone's git filter.

    - <prefix>/etc/jupyter/jupyter_server_config.json: read by every `jupyter lab` of this environment (the
      jupyter_server_config.d/ folder beside it only enables extensions: settings there are not read);
    - <prefix>/share/jupyter/lab/settings/overrides.json: JupyterLab's defaults for its own settings.
    """
    link(root / "lab" / "jupyter_server_config.json", prefix / "etc" / "jupyter" / "jupyter_server_config.json")
    link(root / "lab" / "overrides.json", prefix / "share" / "jupyter" / "lab" / "settings" / "overrides.json")
    if (root / ".git").exists():  # a checkout or a worktree; not an exported tarball
        install_git_filter(root)


if __name__ == "__main__":
    from tuneforge.core.paths import repo_root

    install(repo_root())
    print("JupyterLab: lab/ settings linked (offline, notebooks/ saved without outputs); nbstripout is the git filter")
