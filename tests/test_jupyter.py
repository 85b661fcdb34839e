"""JupyterLab, as an analyst uses it: a stage notebook runs in the server's kernel, is saved through the server,
and neither git nor DVC sees the run; the UI loads offline in headless Chromium.

Runs in a temporary git copy of the repository, set up the way scripts/setup.sh sets up a clone.
"""

import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

from tests.conftest import ROOT, copy_repo, git
from tuneforge.report.jupyter import clean_notebook, install

pytestmark = pytest.mark.slow  # starts JupyterLab and runs notebooks

NOTEBOOK = "notebooks/00_prepare.ipynb"  # the cheapest stage: seconds, no model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, repo: Path, port: int, token: str):
        self.repo, self.port, self.token = repo, port, token
        self.url = f"http://127.0.0.1:{port}"

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        return json.loads(data) if data else {}


@pytest.fixture(scope="module")
def lab(module_tmp):
    tmp = module_tmp
    repo = copy_repo(tmp / "repo")
    env_prefix = tmp / "env"  # stands in for .venv: setup.sh links the server config into sys.prefix
    install(repo, prefix=env_prefix)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_PATH": str(env_prefix / "etc" / "jupyter"),
           "JUPYTER_CONFIG_DIR": str(tmp / "user-config"), "JUPYTER_DATA_DIR": str(tmp / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "PYTHONPATH": str(repo / "src"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("TUNEFORGE_ROOT", None)
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                               f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0",
                               f"--LabApp.app_settings_dir={env_prefix / 'share' / 'jupyter' / 'lab' / 'settings'}",
                               "--LabApp.expose_app_in_browser=True",  # the UI test drives it as a user would
                               *(["--allow-root"] if os.geteuid() == 0 else [])],
                              cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    handle = Lab(repo, port, token)
    deadline = time.monotonic() + 120
    while True:
        try:
            handle.api("GET", "/api/status")
            break
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    handle.log = tmp / "server.log"
    assert "Extension Manager is 'readonly'" in handle.log.read_text()  # the repository's settings were read
    yield handle
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


async def run_in_kernel(lab: Lab, kernel_id: str, cells: list) -> dict:
    """Execute each code cell over the kernel's websocket as JupyterLab does; fill in outputs and counts.

    Returns the kernel_info_reply's content (JupyterLab stores its language_info in the notebook).
    """
    from tornado.websocket import websocket_connect

    session = uuid.uuid4().hex
    ws = await websocket_connect(f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels"
                                 f"?session_id={session}&token={lab.token}")

    async def request(msg_type: str, content: dict) -> tuple[dict, list[dict]]:
        msg_id = uuid.uuid4().hex
        await ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": msg_type, "username": "test", "session": session,
                       "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "content": content, "channel": "shell", "buffers": []}))
        reply, iopub, idle = None, [], False
        while reply is None or not idle:
            msg = json.loads(await asyncio.wait_for(ws.read_message(), timeout=300))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["channel"] == "shell":
                reply = msg
            elif msg["channel"] == "iopub":
                if msg["msg_type"] == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                else:
                    iopub.append(msg)
        return reply, iopub

    info, _ = await request("kernel_info_request", {})
    for cell in cells:
        if cell.cell_type != "code":
            continue
        reply, iopub = await request("execute_request", {"code": cell.source, "silent": False, "store_history": True,
                                                         "user_expressions": {}, "allow_stdin": False,
                                                         "stop_on_error": True})
        cell.outputs = [nbformat.v4.output_from_msg(m) for m in iopub
                        if m["msg_type"] in ("stream", "display_data", "execute_result", "error")]
        cell.execution_count = reply["content"].get("execution_count")
        assert reply["content"]["status"] == "ok", "\n".join(reply["content"].get("traceback", []))
    ws.close()
    return info["content"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dvc_status(repo: Path, stage: str) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", stage], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_a_stage_notebook_runs_in_lab_and_saving_it_changes_nothing(lab):
    repo, file = lab.repo, lab.repo / NOTEBOOK
    before_md5, before_status = md5(file), dvc_status(repo, "prepare@address_json")
    assert git("status", "--porcelain", cwd=repo) == ""

    session = lab.api("POST", "/api/sessions", {"path": NOTEBOOK, "type": "notebook", "name": file.name,
                                                 "kernel": {"name": "python3"}})
    model = lab.api("GET", f"/api/contents/{NOTEBOOK}")
    nb = nbformat.from_dict(model["content"])
    info = asyncio.run(run_in_kernel(lab, session["kernel"]["id"], nb.cells))

    # It ran against this repository's params.yaml and wrote the stage's outputs (kernel cwd: notebooks/).
    assert (repo / "data/processed/address_json/train.jsonl").stat().st_size > 0
    shown = json.dumps([c.outputs for c in nb.cells if c.cell_type == "code"])
    assert "labeled.xml" in shown and "Traceback" not in shown

    # Save as JupyterLab does: outputs, counts, the kernel's spec and language_info.
    spec = lab.api("GET", "/api/kernelspecs")["kernelspecs"]["python3"]["spec"]
    nb.metadata["kernelspec"] = {"display_name": spec["display_name"], "language": spec["language"], "name": "python3"}
    nb.metadata["language_info"] = info["language_info"]
    nb.cells[1].metadata["jupyter"] = {"source_hidden": True}  # view state an analyst may leave behind
    lab.api("PUT", f"/api/contents/{NOTEBOOK}", {"type": "notebook", "format": "json", "content": nb})
    # The same save outside notebooks/ keeps everything: the hook is what cleans, and only stage notebooks.
    lab.api("PUT", "/api/contents/scratch.ipynb", {"type": "notebook", "format": "json", "content": nb})
    assert "execute_result" in (repo / "scratch.ipynb").read_text() or "display_data" in (repo / "scratch.ipynb").read_text()
    (repo / "scratch.ipynb").unlink()

    assert md5(file) == before_md5, "the saved stage notebook differs from the committed file"
    assert git("status", "--porcelain", cwd=repo) == ""
    assert dvc_status(repo, "prepare@address_json") == before_status
    lab.api("DELETE", f"/api/sessions/{session['id']}")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_stage_notebooks_are_stored_as_a_save_writes_them(path):
    """Each committed notebook is what the save hook and the git filter produce from it: byte for byte, so a
    save in JupyterLab changes neither git's nor DVC's view of it."""
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert nbformat.writes(clean_notebook(nb)) + "\n" == path.read_text(encoding="utf-8")
    assert nb.metadata.kernelspec.display_name == "Python 3 (ipykernel)"  # what JupyterLab's kernel writes back


def test_git_filter_strips_a_notebook_saved_elsewhere(lab):
    """Another editor writes outputs into the file: what git stages is still the committed notebook (nbstripout).

    (git status lists such a file as modified until `git add` refreshes its index entry: git takes a changed size
    for a change without running the filter. The save hook avoids that for JupyterLab, and keeps DVC's hash.)
    """
    repo, file = lab.repo, lab.repo / NOTEBOOK
    original = file.read_bytes()
    nb = nbformat.reads(original.decode(), as_version=4)
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    nb.cells[1].execution_count = 1
    try:
        nbformat.write(nb, file)
        assert git("diff", cwd=repo) == ""
        git("add", NOTEBOOK, cwd=repo)
        assert git("status", "--porcelain", cwd=repo) == ""
        assert "hello" in file.read_text()  # the working file keeps its outputs; only git's copy is clean
    finally:
        file.write_bytes(original)
        git("add", NOTEBOOK, cwd=repo)


def page_requests_elsewhere(netlog: Path, port: int) -> set[str]:
    """URLs the page asked for anywhere but the Jupyter server, from Chromium's net log.

    Chromium itself calls its update, sign-in and autofill services (they fail here: names do not resolve); the
    page's requests are told apart by their traffic annotation, the ones its loopback requests carry.
    """
    log = json.loads(netlog.read_text())
    alive = log["constants"]["logEventTypes"]["REQUEST_ALIVE"]
    requests = [(e["params"]["url"], e["params"].get("traffic_annotation")) for e in log["events"]
                if e["type"] == alive and "url" in e.get("params", {})]
    local = re.compile(rf"(https?|wss?)://127\.0\.0\.1:{port}/")
    page = {annotation for url, annotation in requests if local.match(url)}
    assert page, "no request reached the Jupyter server"
    return {url for url, annotation in requests if annotation in page and not local.match(url)}


# Runs in the page: wait for the notebook and its kernel, run every cell and save, both with JupyterLab's own
# commands (what Run > Run All Cells and File > Save do); report what the page shows.
RUN_ALL_AND_SAVE = """(async () => {
  for (let i = 0; i < 1200 && !window.jupyterapp; i++) await new Promise(r => setTimeout(r, 100));
  const app = window.jupyterapp;
  await app.restored;
  let panel = null;
  for (let i = 0; i < 1200 && !(panel && panel.sessionContext); i++) {
    panel = app.shell.currentWidget;
    await new Promise(r => setTimeout(r, 100));
  }
  await panel.context.ready;
  await panel.sessionContext.ready;
  const ran = await app.commands.execute("notebook:run-all-cells");
  await app.commands.execute("docmanager:save");
  const cells = panel.content.model.cells;
  let outputs = 0;
  for (let i = 0; i < cells.length; i++) outputs += cells.get(i).outputs ? cells.get(i).outputs.length : 0;
  return JSON.stringify({ran, outputs, dirty: panel.context.model.dirty,
                         news: document.body.innerText.includes("official Jupyter news"),
                         text: panel.node.innerText.slice(0, 4000)});
})()"""


async def devtools(port: int, expression: str, screenshot: Path) -> dict:
    """Evaluate a script in Chromium's page over the DevTools protocol, then capture a screenshot."""
    import base64

    from tornado.httpclient import AsyncHTTPClient
    from tornado.websocket import websocket_connect

    for _ in range(300):  # the browser opens its debugging port a moment after it starts
        try:
            targets = json.loads((await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/list")).body)
            page = next(t for t in targets if t["type"] == "page")
            break
        except (ConnectionError, OSError, StopIteration):
            await asyncio.sleep(0.2)
    ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)

    async def call(method: str, **params) -> dict:
        """The protocol's reply: {"id", "result"} or {"id", "error"}."""
        call.id = getattr(call, "id", 0) + 1
        await ws.write_message(json.dumps({"id": call.id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.read_message(), timeout=300))
            if msg.get("id") == call.id:
                return msg

    for _ in range(20):  # the page may still be navigating (the token login) when the script first runs
        reply = await call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "context" not in reply.get("error", {}).get("message", ""):
            break
        await asyncio.sleep(1)
    assert "error" not in reply, reply
    result = reply["result"]
    assert "exceptionDetails" not in result, result
    shot = await call("Page.captureScreenshot", format="png")
    screenshot.write_bytes(base64.b64decode(shot["result"]["data"]))
    ws.close()
    # Closed through the protocol, the browser finishes its net log (a killed one leaves it cut short).
    version = json.loads((await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/version")).body)
    ws = await websocket_connect(version["webSocketDebuggerUrl"])
    await ws.write_message(json.dumps({"id": 1, "method": "Browser.close"}))
    return json.loads(result["result"]["value"])


def test_lab_ui_runs_and_saves_a_stage_notebook_offline(lab, tmp_path):
    """The real UI in headless Chromium, name resolution blocked: Run All, Save; nothing changes for git or DVC."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    repo, file = lab.repo, lab.repo / NOTEBOOK
    before_md5, before_status = md5(file), dvc_status(repo, "prepare@address_json")
    netlog, shot, debug_port = tmp_path / "netlog.json", tmp_path / "lab.png", free_port()
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         # Every name but the loopback address fails to resolve: nothing can come from the network.
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1280,900",
         f"--remote-debugging-port={debug_port}", f"--log-net-log={netlog}",
         f"{lab.url}/lab/tree/{NOTEBOOK}?token={lab.token}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        shown = asyncio.run(devtools(debug_port, RUN_ALL_AND_SAVE, shot))
    finally:
        try:
            browser.wait(timeout=60)
        except subprocess.TimeoutExpired:
            browser.kill()
    assert shown["ran"] is True and shown["outputs"] >= 3 and not shown["dirty"], shown
    assert "labeled.xml" in shown["text"] and "Traceback" not in shown["text"]  # the run's output, on screen
    assert not shown["news"]  # lab/overrides.json: no news prompt
    assert shot.stat().st_size > 20_000  # kept in this test's tmp dir for a look
    assert not page_requests_elsewhere(netlog, lab.port)
    assert md5(file) == before_md5, "the notebook JupyterLab saved differs from the committed file"
    assert git("status", "--porcelain", cwd=repo) == ""
    assert dvc_status(repo, "prepare@address_json") == before_status
