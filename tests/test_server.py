"""The real MLflow tracking server on a loopback port: jobs log to it, its REST API finds them."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_embdist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(base: str, endpoint: str, body: dict | None = None) -> dict:
    if body is None:
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}")
    else:
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def server(tmp_path):
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: the server's workers go down with it
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {proc.stderr.read()}")
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("mlflow server did not answer on loopback within 90 s")
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # uvicorn / job-runner children that ignored SIGTERM
        except ProcessLookupError:
            pass


def test_runs_logged_to_the_server_are_found_through_rest(home, planted_matrix, server):
    path, _, _ = planted_matrix
    run_embdist("model=custom", f"model.path={path}", "bbox=all", "task.progress=false",
                home=home, env={"MLFLOW_TRACKING_URI": server})
    assert not (home / "mlflow.db").exists()  # the environment's URI replaced the default store
    exp = rest(server, "experiments/get-by-name?experiment_name=embdist")["experiment"]
    runs = rest(server, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["n_tokens"] == 300 and metrics["euclidean/zero_pairs"] == 22
    arts = rest(server, f"artifacts/list?run_id={run['info']['run_id']}")
    assert "embdist.log" in {f["path"] for f in arts.get("files", [])}
