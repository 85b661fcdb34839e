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


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """A folder shared by one test module and removed after it: the pipeline copies, GGUFs and DVC caches
    the modules write add up to tens of GB, more than a CI disk may have free."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


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


def load_script(name: str):
    """A module of scripts/ (e.g. make_random_model, which builds tiny random-weight models of real families)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


# Two short chat records, one a task: what the GGUF tests generate and compare on.
CHAT_RECORDS = [
    {"messages": [{"role": "system", "content": "Parse the US address into JSON."},
                  {"role": "user", "content": "1600 Pennsylvania Ave NW, Washington, DC 20500"},
                  {"role": "assistant", "content": '{"AddressNumber": "1600", "StreetName": "Pennsylvania"}'}]},
    {"messages": [{"role": "system", "content": "Classify the SMS as spam or ham."},
                  {"role": "user", "content": "WINNER!! Claim your prize now"},
                  {"role": "assistant", "content": "spam"}]},
]


def dump_dom_offline(chromium: str, page: Path, profile: Path) -> str:
    """The page's DOM after headless Chromium rendered it with every host name failing to resolve (no network)."""
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    # A rendered page: over 1,000 characters, or half its file for a page that small (a drift page without traffic)
    assert dom.returncode == 0 and len(dom.stdout) > min(1000, page.stat().st_size // 2), dom.stderr[-2000:]
    return dom.stdout
