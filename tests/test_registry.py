"""Registry handoff against a real MLflow tracking server on 127.0.0.1: register, aliases, the promotion gate,
and a fresh process that loads ``@champion`` and fuses a real pair exactly as the checkpoint does."""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cs2fusion.checkpoint import load_checkpoint, save_checkpoint
from cs2fusion.inference import Fuser
from cs2fusion.inference.kernels import build_location
from cs2fusion.io import read_image
from tests.conftest import DATA, RS40, free_port, start_mlflow_server, started
from tests.tiny import env

pytestmark = [pytest.mark.slow, pytest.mark.data]
NAME = "cs2fusion-test"
GOOD = {"EN": 7.0, "SD": 40.0, "SF": 12.0, "AG": 4.0, "MI": 3.0, "SCD": 1.3, "VIF": 0.7, "Qabf": 0.5, "SSIM": 0.9}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


ON = {"set": "rs40/test", "metrics": "mmif-cddfuse-1"}


def _register(uri: str, checkpoint: Path, evaluation: dict, tmp: Path, name: str = NAME, on: dict = ON) -> dict:
    from pipeline.mlflow_adapter import new_run
    from pipeline.registry import register

    tracker = new_run(uri, "registry-test", None, "r")
    model = tmp / f"{tracker.run_id}.safetensors"
    ckpt = load_checkpoint(checkpoint)
    save_checkpoint(model, ckpt.backbone, mlflow_run_id=tracker.run_id)
    return register(tracker, model, name=name, evaluation=evaluation, judged_on=on, gate_metrics=list(GOOD),
                    min_wins=5, card="# test card", tags={"mlflow_run_id": tracker.run_id})


def test_register_gate_and_fresh_process_load(server: str, published_ckpt: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server)
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    first = _register(server, published_ckpt, GOOD, tmp_path)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # no tracking URI leaks to later child processes
    assert first["promoted"] and client.get_model_version_by_alias(NAME, "champion").version == first["version"]

    worse = {k: v * 0.9 for k, v in GOOD.items()}
    worse["EN"] = 8.0  # wins one metric: not enough
    second = _register(server, published_ckpt, worse, tmp_path)
    assert not second["promoted"] and second["wins"] == ["EN"]
    assert client.get_model_version_by_alias(NAME, "champion").version == first["version"]
    assert client.get_model_version_by_alias(NAME, "challenger").version == second["version"]

    better = {k: v * 1.1 for k, v in GOOD.items()}
    better["SSIM"] = 0.1
    third = _register(server, published_ckpt, better, tmp_path)
    assert third["promoted"] and len(third["wins"]) == 8
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == third["version"] and champion.description == "# test card"
    assert json.loads(champion.tags["decision"])["previous_champion"] == first["version"]
    assert json.loads(champion.tags["judged_on"]) == ON

    # fails closed: an evaluation of another set is not comparable; a champion whose evaluation tag is gone (an
    # interrupted register) is never beaten by default
    much_better = {k: v * 2 for k, v in GOOD.items()}
    other = _register(server, published_ckpt, much_better, tmp_path, on={**ON, "set": "other/test"})
    assert not other["promoted"] and "not comparable" in other["reason"]
    client.delete_model_version_tag(NAME, third["version"], "evaluation")
    halved = _register(server, published_ckpt, {k: v * 0.5 for k, v in GOOD.items()}, tmp_path)
    assert not halved["promoted"] and "no readable evaluation" in halved["reason"] and halved["wins"] == []
    assert client.get_model_version_by_alias(NAME, "champion").version == third["version"]

    # The version is a model from code: its files hold our source and the checkpoint, no pickle to load.
    import mlflow

    from pipeline.mlflow_adapter import fluent_uri

    with fluent_uri(server):  # models:/ URIs resolve through the process's registry URI
        files = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion",
                                                         dst_path=str(tmp_path / "downloaded")))
    stored = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
    assert "pyfunc_model.py" in stored and not [p for p in stored if p.endswith((".pkl", ".pickle"))], stored

    # A fresh process elsewhere, knowing only the server: loads @champion, fuses a colour and a grey pair.
    pairs = {"colour": (RS40 / "ir" / "1.png", RS40 / "vi" / "1.png"),
             "grey": (DATA / "tno40" / "ir" / "5.png", DATA / "tno40" / "vi" / "5.png")}
    script = (
        "import sys, numpy as np, mlflow.pyfunc\n"
        "from PIL import Image\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "for name, ir_p, vi_p, out in zip(*[iter(sys.argv[1:])] * 4):\n"
        "    ir = np.asarray(Image.open(ir_p)); vi = np.asarray(Image.open(vi_p))\n"
        "    vi = vi if vi.ndim == 3 else vi[:, :, None]\n"
        "    np.save(out, m.predict({'ir': ir[None], 'vi': vi[None]})[0])\n"
    )
    args = [str(x) for k, (i, v) in pairs.items() for x in (k, i, v, tmp_path / f"{k}.npy")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=elsewhere, capture_output=True, text=True,
                          env={**env(MLFLOW_TRACKING_URI=server), "PYTHONPATH": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fuser = Fuser(load_checkpoint(published_ckpt).backbone)
    for name, (ir_p, vi_p) in pairs.items():
        expected = fuser.fuse(vis=read_image(vi_p), ir=read_image(ir_p))
        got = np.load(tmp_path / f"{name}.npy")
        assert np.array_equal(got.reshape(expected.shape), expected), name

    # and the CLI takes the same URI
    src = tmp_path / "one"
    for kind in ("ir", "vi"):
        (src / kind).mkdir(parents=True)
        (src / kind / "1.png").write_bytes((RS40 / kind / "1.png").read_bytes())
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "cs2fusion", "fuse", "--model", f"models:/{NAME}@champion",
                           "--ir", str(src / "ir"), "--vi", str(src / "vi"), "--out", str(tmp_path / "cli")],
                          capture_output=True, text=True, timeout=300, cwd=elsewhere,
                          env=env(MLFLOW_TRACKING_URI=server, TMPDIR=str(temp), HOME=str(tmp_path / "home"),
                                  CS2FUSION_KERNEL_CACHE=str(build_location().parents[2])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(temp.iterdir())  # the download is not left behind; the checkpoint is kept in the cache
    assert len(list((tmp_path / "home" / ".cache" / "cs2fusion" / "models").glob("*.safetensors"))) == 1
    expected = fuser.fuse(vis=read_image(RS40 / "vi" / "1.png"), ir=read_image(RS40 / "ir" / "1.png"))
    assert np.array_equal(read_image(tmp_path / "cli" / "1.png"), expected)


def _post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _declared(port: int, length: int) -> tuple[int, bytes]:
    """POST /invocations declaring a ``length``-byte JSON body, answered before any of it is sent."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(length))
    connection.endheaders()
    response = connection.getresponse()
    try:
        return response.status, response.read()
    finally:
        connection.close()


def _multipart(**files: bytes) -> tuple[bytes, str]:
    parts = [f'--b0\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n\r\n'.encode()
             + data + b"\r\n" for name, data in files.items()]
    return b"".join(parts) + b"--b0--\r\n", "multipart/form-data; boundary=b0"


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _refused(answer: tuple[int, bytes], status: int, says: str) -> None:
    code, body = answer
    message = json.loads(body)["message"]
    assert code == status and says in message and "\n" not in message and len(message) < 200, (code, message)


def test_serving_the_champion_bounds_each_request(server: str, published_ckpt: Path, tmp_path: Path) -> None:
    """``python -m pipeline.serve -m models:/<name>@champion`` in a fresh process (limits cut to test size): a real
    colour pair as MLflow's JSON and as PNG files is fused exactly as the library fuses it; floats, ragged arrays,
    a size mismatch, 2- and 4-channel visible images answer 400 in one line; a body over the limit and a pair over
    the pixel limit 413; small requests are answered while a large one fuses."""
    name = "cs2fusion-serve-test"
    assert _register(server, published_ckpt, GOOD, tmp_path, name=name)["promoted"]
    port, log_file = free_port(), tmp_path / "serve.log"
    with open(log_file, "w") as log:
        proc = started(subprocess.Popen(
            [sys.executable, "-m", "pipeline.serve", "-m", f"models:/{name}@champion", "--port", str(port),
             "--max-body-mb", "4", "--max-pixels", "2000000", "--small-pixels", "200000"],
            cwd=tmp_path, env=env(MLFLOW_TRACKING_URI=server), stdout=log, stderr=log))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log_file.read_text()[-3000:]
                time.sleep(1)
        ir, vi = read_image(RS40 / "ir" / "1.png"), read_image(RS40 / "vi" / "1.png")
        expected = Fuser(load_checkpoint(published_ckpt).backbone).fuse(vis=vi, ir=ir)
        status, body = _post(f"{url}/invocations", json.dumps(
            {"inputs": {"ir": ir[None].tolist(), "vi": vi[None].tolist()}}).encode(), "application/json")
        assert status == 200 and np.array_equal(np.asarray(json.loads(body)["predictions"], np.uint8)[0], expected)
        status, body = _post(f"{url}/fuse", *_multipart(ir=_png(ir), vi=_png(vi)))
        assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(body))), expected)

        def invoke(ir_value: object, vi_value: object) -> tuple[int, bytes]:
            return _post(f"{url}/invocations", json.dumps({"inputs": {"ir": ir_value, "vi": vi_value}}).encode(),
                         "application/json")

        grey = [[[0, 10], [20, 30]]]
        _refused(invoke([[[0.0, 0.1], [0.2, 0.3]]], [[[[0], [0]], [[0], [0]]]]), 400, "floats are refused")
        _refused(invoke([[[0, 10], [20]]], [[[[0], [0]], [[0], [0]]]]), 400, "not a rectangular array")
        _refused(invoke(grey, [[[[0, 1], [0, 1]], [[0, 1], [0, 1]]]]), 400, "vi has 2 channels")
        _refused(invoke(grey, [[[[0] * 4] * 3] * 2]), 400, "vi has 4 channels")
        _refused(invoke([[[0, 10, 3], [20, 30, 3]]], [[[[0], [0]], [[0], [0]]]]), 400, "differ")
        _refused(invoke([[[0, 300], [20, 30]]], [[[[0], [0]], [[0], [0]]]]), 400, "outside 0-255")
        _refused(_post(f"{url}/fuse", *_multipart(ir=_png(ir), vi=_png(vi[:-16]))), 400, "differ in size")
        _refused(_post(f"{url}/fuse", *_multipart(ir=_png(ir)[:1000], vi=_png(vi))), 400, "corrupt or truncated")
        _refused(_declared(port, 5 * 2 ** 20), 413, "over 4 MB")  # answered from the headers: no body is sent
        huge = np.zeros((1200, 1800), np.uint8)  # 2.16 MP in a few kB: under the body limit, over the pixel limit
        _refused(_post(f"{url}/fuse", *_multipart(ir=_png(huge), vi=_png(huge))), 413, "2000000-pixel limit")

        large = {"ir": _png(np.asarray(Image.fromarray(ir).resize((1600, 1200)))),
                 "vi": _png(np.asarray(Image.fromarray(vi).resize((1600, 1200))))}
        answered, done = [], threading.Event()

        def fuse_large() -> None:
            answered.append(("large", _post(f"{url}/fuse", *_multipart(**large))[0]))
            done.set()

        worker = threading.Thread(target=fuse_large)
        worker.start()
        time.sleep(1.0)
        while not done.is_set() and len(answered) < 3:
            answered.append(("small", invoke(ir[None, :64, :64].tolist(), vi[None, :64, :64].tolist())[0]))
        worker.join(timeout=300)
        assert answered[:3] == [("small", 200)] * 3 and answered[-1] == ("large", 200), answered
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode in (0, -15), log_file.read_text()[-3000:]
