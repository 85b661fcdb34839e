import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach a model hub during tests
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """models/base when the pipeline has made it, else a fresh copy from the embedded GGUF."""
    made = ROOT / "models" / "base"
    if (made / "model.safetensors").exists():
        return made
    from tuneforge.core.params import ModelSpec
    from tuneforge.stages.base_model import save_base_model

    out = tmp_path_factory.mktemp("base")
    save_base_model(ModelSpec(), out)
    return out


@pytest.fixture(scope="session")
def tokenizer(base_model_dir):
    from tuneforge.core.modeling import load_tokenizer

    return load_tokenizer(base_model_dir)


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def copy_repo(dest: Path) -> Path:
    """The working tree's tracked and untracked-but-not-ignored files, as a fresh git repo."""
    files = git("ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=ROOT).split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if (ROOT / "vendor").exists():
        (dest / "vendor").symlink_to(ROOT / "vendor")  # the fetched GGUF converter (git-ignored)
    git("init", "-q", cwd=dest)
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "-A", cwd=dest)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "copy", cwd=dest)
    return dest
