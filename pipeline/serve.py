"""``python -m pipeline.serve -m MODEL_URI``: a registered model as a REST service that bounds what a request costs.

- ``POST /fuse``: the two image files as multipart fields ``ir`` and ``vi`` (PNG, JPEG, BMP, TIFF; what ``fuse``
  reads) → the fused PNG (colour where the visible image is).
- ``POST /invocations``: MLflow's JSON, ``{"inputs": {"ir": (N, H, W), "vi": (N, H, W, 1|3)}}`` of integers 0–255
  → ``{"predictions": (N, H, W, 1|3)}``, as ``mlflow models serve`` answers it.
- ``GET /ping``: 200 once the model is loaded.

A body over ``--max-body-mb`` answers 413 before it is read, a request over ``--max-pixels`` 413 before it is decoded;
floats, ragged arrays, size mismatches and visible images of 2 or 4 channels answer 400; every refusal is one line of
JSON ``{"error_code", "message"}`` that never echoes the data. Requests of at most ``--small-pixels`` run in lanes of
their own, so they keep being answered while a large one fuses (one at a time, in exact tiles at a bounded memory).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import logging
import time
from typing import Any, Awaitable, Callable

import numpy as np

from cs2fusion.inference.fuser import check_stack
from cs2fusion.io import InputError, as_grey, decode_image
from pipeline.common import clean_errors, setup_logging

log = logging.getLogger("pipeline.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may cost. ``max_pixels`` counts the pixels of the batch (N × H × W); requests of at most
    ``small_pixels`` run in ``small_lanes`` lanes of their own; ``large_waiting`` larger ones may wait for theirs."""

    max_body_mb: float = 64.0
    max_pixels: int = 12_000_000
    small_pixels: int = 1_000_000
    small_lanes: int = 1
    large_waiting: int = 2

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * 2 ** 20)


class Refused(Exception):
    """A request answered with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


CODES = {400: "BAD_REQUEST", 413: "REQUEST_TOO_LARGE", 503: "BUSY", 500: "INTERNAL_ERROR"}


def integer_pixels(name: str, value: Any) -> np.ndarray:
    """A JSON value as a uint8 array: integers 0–255 only (floats are refused, never truncated)."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise Refused(400, f"{name}: not a rectangular array (rows of different lengths)") from None
    if array.dtype.kind == "f":
        raise Refused(400, f"{name}: floats are refused; send integers 0-255 (a 0-1 image: multiply by 255 and "
                           "round)")
    if array.dtype.kind not in "iu":
        got = {"b": "booleans", "U": "strings", "O": "nulls or nested values"}.get(array.dtype.kind, "other values")
        raise Refused(400, f"{name}: expected an array of integers 0-255, got {got}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise Refused(400, f"{name}: values outside 0-255 (min {array.min()}, max {array.max()})")
    return array.astype(np.uint8)


def _size(data: bytes) -> tuple[int, int]:
    """An image's width and height from its header, without decoding it ((0, 0) for a non-image: its decode names
    the fault)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # Pillow raises many types for a non-image
        return 0, 0


def _label(name: str, filename: str) -> str:
    return f"{name} ({filename or 'upload'})"


def _image(name: str, data: bytes, filename: str) -> np.ndarray:
    """An uploaded image decoded with ``fuse``'s input policy; a bad one is a 400 naming it."""
    try:
        return decode_image(io.BytesIO(data), _label(name, filename))
    except InputError as err:
        raise Refused(400, str(err)) from None


class Service:
    """The model's lanes: each small lane and the large lane own a fuser (its scratch memory; a fuser serves one
    image at a time). The large lane fuses in exact tiles beyond ``small_pixels``, so its memory stays bounded."""

    def __init__(self, backbone: Any, limits: Limits) -> None:
        from cs2fusion.inference import FuseOptions, Fuser

        self.limits = limits
        self.small_fusers = [Fuser(backbone) for _ in range(limits.small_lanes)]
        self.large_fuser = Fuser(backbone, options=FuseOptions(max_pixels=limits.small_pixels))
        self.small: asyncio.Queue | None = None
        self.large: asyncio.Semaphore | None = None
        self.waiting = 0

    async def run(self, pixels: int, work: Callable[[Any], Any]) -> Any:
        """Runs ``work(fuser)`` in a thread: in a free small lane, or in the large lane (503 when too many wait)."""
        if self.small is None:  # made in the server's event loop
            self.small, self.large = asyncio.Queue(), asyncio.Semaphore(1)
            for fuser in self.small_fusers:
                self.small.put_nowait(fuser)
        if pixels <= self.limits.small_pixels:
            fuser = await self.small.get()
            try:
                return await asyncio.to_thread(work, fuser)
            finally:
                self.small.put_nowait(fuser)
        if self.large.locked() and self.waiting >= self.limits.large_waiting:
            raise Refused(503, f"busy: one large request fusing and {self.waiting} waiting; retry later")
        self.waiting += 1
        try:
            await self.large.acquire()
        finally:
            self.waiting -= 1
        try:
            return await asyncio.to_thread(work, self.large_fuser)
        finally:
            self.large.release()


async def _body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    over = f"request body over {limit / 2 ** 20:g} MB (--max-body-mb); send images to /fuse, or smaller tiles"
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, over)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, over)
        chunks.append(chunk)
    return b"".join(chunks)


def app(service: Service) -> Any:
    """The Starlette application serving ``service``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    limits = service.limits

    def endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except Refused as err:
                response = JSONResponse({"error_code": CODES[err.status], "message": str(err)}, err.status)
            except Exception as err:  # a fault of ours: one line to the client, the trace to our log
                log.exception("%s %s failed", request.method, request.url.path)
                response = JSONResponse({"error_code": CODES[500], "message": f"{type(err).__name__}: internal "
                                         "error (see the server's log)"}, 500)
            log.info("%s %s %d %.2f s", request.method, request.url.path, response.status_code,
                     time.perf_counter() - start)
            return response
        return wrapped

    async def ping(request: Request) -> Response:
        return PlainTextResponse("\n")

    async def invocations(request: Request) -> Response:
        if "json" not in request.headers.get("content-type", ""):
            raise Refused(400, "Content-Type must be application/json (images as files: POST /fuse)")
        body = await _body(request, limits.max_body)

        def parse() -> tuple[np.ndarray, np.ndarray]:
            try:
                data = json.loads(body)
            except ValueError as err:
                raise Refused(400, f"the body is not JSON ({str(err).splitlines()[0][:80]})") from None
            inputs = data.get("inputs") if isinstance(data, dict) else None
            if not isinstance(inputs, dict) or not {"ir", "vi"} <= set(inputs):
                raise Refused(400, 'expected {"inputs": {"ir": [...], "vi": [...]}}')
            ir, vi = integer_pixels("ir", inputs["ir"]), integer_pixels("vi", inputs["vi"])
            try:
                check_stack(vis=vi, ir=ir)
            except InputError as err:
                raise Refused(400, str(err)) from None
            if ir.size > limits.max_pixels:
                raise Refused(413, f"{ir.shape[0]} x {ir.shape[1]}x{ir.shape[2]} pixels is over the "
                                   f"{limits.max_pixels}-pixel limit (--max-pixels)")
            return ir, vi

        ir, vi = await asyncio.to_thread(parse)
        fused = await service.run(ir.size, lambda fuser: fuser.fuse_stack(vis=vi, ir=ir))
        return Response(json.dumps({"predictions": fused.tolist()}), media_type="application/json")

    async def fuse(request: Request) -> Response:
        body = await _body(request, limits.max_body)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=2, max_fields=0)
        except Exception as err:  # Starlette's parser raises HTTPException/AssertionError/MultiPartException
            raise Refused(400, f"expected multipart/form-data with files ir and vi ({err})") from None
        files = {}
        for name in ("ir", "vi"):
            upload = form.get(name)
            if upload is None or isinstance(upload, str):
                raise Refused(400, f"missing the file field {name!r} (curl -F {name}=@{name}.png)")
            files[name] = (await upload.read(), upload.filename or "")

        def work(fuser: Any) -> bytes:
            from PIL import Image

            ir = as_grey(_image("ir", *files["ir"]))  # as the fuse command reads infrared
            vi = _image("vi", *files["vi"])
            if ir.shape[:2] != vi.shape[:2]:
                raise Refused(400, f"ir {ir.shape[1]}x{ir.shape[0]} and vi {vi.shape[1]}x{vi.shape[0]} differ in "
                                   "size: the pair must be registered")
            fused = fuser.fuse(vis=vi, ir=ir)
            out = io.BytesIO()
            Image.fromarray(fused).save(out, format="PNG", compress_level=1)
            return out.getvalue()

        pixels = 0
        for name, (data, filename) in files.items():  # from the headers: decoded only inside a lane
            width, height = _size(data)
            if width * height > limits.max_pixels:
                raise Refused(413, f"{_label(name, filename)}: {width}x{height} is over the {limits.max_pixels}-pixel "
                                   "limit (--max-pixels)")
            pixels = max(pixels, width * height)
        return Response(await service.run(pixels, work), media_type="image/png")

    routes = [Route("/ping", endpoint(ping), methods=["GET"]), Route("/health", endpoint(ping), methods=["GET"]),
              Route("/invocations", endpoint(invocations), methods=["POST"]),
              Route("/fuse", endpoint(fuse), methods=["POST"])]
    return Starlette(routes=routes)


def load_backbone(model_uri: str) -> Any:
    """The network inside a registered pyfunc model (``models:/name@alias``, ``runs:/…``, a local folder)."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().fuser.backbone


@clean_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model-uri", required=True, help="models:/cs2fusion@champion, runs:/…, or a model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5001)
    for field in dataclasses.fields(Limits):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs too")
    args = p.parse_args()
    setup_logging(args)
    import uvicorn

    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    service = Service(load_backbone(args.model_uri), limits)
    log.info("serving %s on http://%s:%d (%s)", args.model_uri, args.host, args.port, limits)
    uvicorn.run(app(service), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
