"""Local paths and object-store URLs (``s3://bucket/prefix``, any fsspec scheme) behind one small API.

An S3-compatible server (MinIO, Ceph, a test's moto) is selected the standard way, ``AWS_ENDPOINT_URL``, which boto3,
s3fs and pyarrow (Ray's storage) all read; credentials likewise (``AWS_ACCESS_KEY_ID``, …).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from tqdm import tqdm

from cs2fusion.io import OUTPUT_MARKER, InputError, is_url
from cs2fusion.io import write_text as write_local_text


def join(base: str | Path, *parts: str) -> str:
    """``base/part/…`` for a URL or a path (as a string)."""
    return posixpath.join(str(base), *parts) if is_url(base) else str(Path(base, *parts))


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL; a missing backend (s3fs for s3://) is one line."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)  # other processes write the same prefixes
    except (ImportError, ValueError) as err:
        raise InputError(f"{url}: no filesystem for this URL ({err}); install the cloud extra "
                         "(pip install -e '.[cloud]')") from None


def open_read(location: str | Path) -> IO[bytes]:
    """A binary stream of a file or an object; a missing one is an InputError naming it."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = filesystem(str(location))
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{location}: no such object") from None


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a file or an object."""
    with open_read(location) as stream:
        return stream.read()


def size(location: str | Path) -> int | None:
    """Bytes of a file or an object; None where it does not exist."""
    if not is_url(location):
        path = Path(location)
        return path.stat().st_size if path.is_file() else None
    fs, path = filesystem(str(location))
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def write_text(location: str | Path, text: str) -> None:
    """Writes a small text file or object whole (local files atomically)."""
    if is_url(location):
        fs, path = filesystem(str(location))
        fs.pipe_file(path, text.encode())
    else:
        write_local_text(location, text)


def read_text(location: str | Path) -> str | None:
    """A small text file or object; None where it does not exist."""
    return read_bytes(location).decode() if size(location) is not None else None


@contextlib.contextmanager
def remote_output(url: str, owner: str, *, index: str) -> Iterator[Path]:
    """Yields a local temporary folder; if the block succeeds it replaces the objects under ``url``.

    As :func:`cs2fusion.io.atomic_dir`, only an empty prefix or an earlier output of the same ``owner`` is replaced.
    Readers wait for ``index``: it is removed first and uploaded last, so no reader sees a mixed set.
    """
    fs, root = filesystem(url)
    marker = posixpath.join(root, OUTPUT_MARKER)
    if fs.exists(root) and fs.ls(root) and not (fs.exists(marker) and fs.cat_file(marker).decode().strip() == owner):
        raise InputError(f"{url}: not empty and not an earlier output of the {owner} stage; refusing to replace it")
    with tempfile.TemporaryDirectory(prefix="cs2fusion-upload-") as tmp:
        yield Path(tmp)
        (Path(tmp) / OUTPUT_MARKER).write_text(owner + "\n")
        if fs.exists(root):
            if fs.exists(posixpath.join(root, index)):
                fs.rm_file(posixpath.join(root, index))
            fs.rm(root, recursive=True)
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        for path in tqdm(sorted(files, key=lambda p: p.name == index), desc=f"uploading to {url}", unit="file",
                         disable=None):
            fs.put_file(str(path), posixpath.join(root, path.relative_to(tmp).as_posix()))


def exists(location: str | Path) -> bool:
    """True where a file, folder or any object under the prefix exists."""
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(str(location))
    return bool(fs.exists(path))


def remove(location: str | Path) -> None:
    """Deletes a file or object (a missing one is fine)."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(str(location))
    if fs.exists(path):
        fs.rm_file(path)


def move(source: str | Path, target: str | Path) -> None:
    """Renames a folder (local) or copies then deletes every object under a prefix (stores have no rename)."""
    if not is_url(source):
        os.replace(source, target)
        return
    fs, path = filesystem(str(source))
    dest = filesystem(str(target))[1]
    for key in fs.find(path):
        fs.copy(key, posixpath.join(dest, posixpath.relpath(key, path)))
    fs.rm(path, recursive=True)


def upload_file(local: Path, url: str) -> None:
    """Copies one local file to an object-store URL."""
    fs, path = filesystem(url)
    fs.put_file(str(local), path)
