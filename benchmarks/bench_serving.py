"""Serving under load (issue 38): ``python -m pipeline.serve`` of the shipped model, measured from outside.

Rows: a small request alone (256×256 pair, JSON); the largest accepted request, a 4000×3000 colour pair as PNG files
on ``/fuse`` (its time and the server's peak RSS), with small requests sent meanwhile (their latency, all answered);
a 1920×1080 pair as JSON on ``/invocations`` (about 36 MB of body); an over-limit JSON body (110 MB declared: 413).
Run: python -m benchmarks.bench_serving [--out benchmarks/results/serving.json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmarks.common import DATA, REPO, report
from cs2fusion.io import read_image

MODEL = REPO / "cs2fusion" / "pretrained" / "roadscene.safetensors"


def _post(url: str, body: bytes, content_type: str, timeout: float = 600) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _multipart(files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "cs2fusionbench"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _json_pair(ir: np.ndarray, vi: np.ndarray) -> bytes:
    return json.dumps({"inputs": {"ir": ir[None].tolist(), "vi": vi[None].tolist()}}).encode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import mlflow.pyfunc

    from pipeline import pyfunc_model

    folder = Path(tempfile.mkdtemp()) / "model"
    mlflow.pyfunc.save_model(folder, python_model=pyfunc_model.__file__, artifacts={"checkpoint": str(MODEL)},
                             code_paths=[str(REPO / "cs2fusion"), str(REPO / "pipeline")],
                             signature=pyfunc_model.SIGNATURE)
    port = 5091
    server = subprocess.Popen([sys.executable, "-m", "pipeline.serve", "-m", str(folder), "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None
                time.sleep(0.5)
        proc = psutil.Process(server.pid)
        ir, vi = read_image(DATA / "roadscene" / "ir" / "FLIR_00006.png"), read_image(
            DATA / "roadscene" / "vi" / "FLIR_00006.png")
        small = _json_pair(ir[:256, :256] if ir.ndim == 2 else ir[:256, :256, 0], vi[:256, :256])

        def small_latency() -> tuple[int, float]:
            t = time.perf_counter()
            status, _ = _post(f"{url}/invocations", small, "application/json")
            return status, time.perf_counter() - t

        alone = [small_latency()[1] for _ in range(5)]
        rows = [{"request": "256x256 JSON, alone", "status": 200, "s": statistics.median(alone)}]

        big_ir = np.asarray(Image.fromarray(ir).resize((4000, 3000), Image.BICUBIC))
        big_vi = np.asarray(Image.fromarray(vi).resize((4000, 3000), Image.BICUBIC))
        body, kind = _multipart({"ir": _png(big_ir), "vi": _png(big_vi)})
        base = proc.memory_info().rss
        peak, done, answer = [base], threading.Event(), {}

        def large() -> None:
            t = time.perf_counter()
            answer["status"], _ = _post(f"{url}/fuse", body, kind)
            answer["s"] = time.perf_counter() - t
            done.set()

        def watch() -> None:
            while not done.is_set():
                peak.append(proc.memory_info().rss)
                time.sleep(0.05)

        threads = [threading.Thread(target=large), threading.Thread(target=watch)]
        for t in threads:
            t.start()
        during = []
        time.sleep(0.5)
        while not done.is_set():
            during.append(small_latency())
        for t in threads:
            t.join()
        rows.append({"request": f"4000x3000 PNGs on /fuse ({len(body) / 2 ** 20:.1f} MB)", "status": answer["status"],
                     "s": answer["s"], "peak_rss_mb": max(peak) / 2 ** 20, "rss_before_mb": base / 2 ** 20})
        rows.append({"request": f"256x256 JSON meanwhile (n={len(during)})",
                     "status": "/".join(sorted({str(s) for s, _ in during})),
                     "s": statistics.median(x for _, x in during), "max_s": max(x for _, x in during)})
        hd_ir = np.asarray(Image.fromarray(ir).resize((1920, 1080), Image.BICUBIC))
        hd_vi = np.asarray(Image.fromarray(vi).resize((1920, 1080), Image.BICUBIC))
        hd = _json_pair(hd_ir, hd_vi)
        base, peak, done = proc.memory_info().rss, [proc.memory_info().rss], threading.Event()
        watcher = threading.Thread(target=watch)
        watcher.start()
        t0 = time.perf_counter()
        status, _ = _post(f"{url}/invocations", hd, "application/json")
        done.set()
        watcher.join()
        rows.append({"request": f"1920x1080 JSON ({len(hd) / 2 ** 20:.0f} MB)", "status": status,
                     "s": time.perf_counter() - t0, "peak_rss_mb": max(peak) / 2 ** 20,
                     "rss_before_mb": base / 2 ** 20})
        t0 = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(110 * 2 ** 20))
        connection.endheaders()  # a client that waits for the answer to its headers (curl's Expect: 100-continue)
        response = connection.getresponse()
        rows.append({"request": "110 MB JSON declared (over the 64 MB limit)", "status": response.status,
                     "s": time.perf_counter() - t0, "message": json.loads(response.read())["message"][:60]})
        connection.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    report("serving (python -m pipeline.serve, 2 cores)", rows, args.out)


if __name__ == "__main__":
    main()
