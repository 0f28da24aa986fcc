"""`peftserve register NAME SOURCE --url URL [--token T] [--replace]`.

A local directory is uploaded (multipart: its adapter_config.json and *.safetensors, with a progress
bar), so adapters trained on another machine reach the server; anything else is sent as a hub id for the
server to fetch.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


class RegisterError(RuntimeError):
    """The server refused the registration; the message is the server's reason."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="adapter name (1-128 characters from [A-Za-z0-9._-])")
    parser.add_argument("source", help="local adapter directory (uploaded) or a Hugging Face hub id")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default %(default)s)")
    parser.add_argument("--token", default=None, help="admin token (default: $PEFTSERVE_ADMIN_TOKEN)")
    parser.add_argument("--replace", action="store_true", help="register a new version of an existing name")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default %(default)s)")


def _files(directory: Path) -> list[Path]:
    from serve.registry import adapter_files

    return adapter_files(directory)


def _progress_stream(paths: list[Path], boundary: str, fields: dict[str, str], progress: bool):
    """Yield a multipart body in chunks (never the whole adapter in memory) and tick a tqdm bar."""
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=not progress)
    try:
        for k, v in fields.items():
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n").encode()
        for p in paths:
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{p.name}\"\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n").encode()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    bar.update(len(chunk))
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()
    finally:
        bar.close()


def register_adapter(url: str, name: str, source: str, token: str | None = None, replace: bool = False,
                     progress: bool = True, timeout: float = 600.0) -> dict:
    """POST the registration; returns the server's adapter record. Raises RegisterError with its reason."""
    import uuid

    import httpx

    token = token or os.environ.get("PEFTSERVE_ADMIN_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    path = Path(source).expanduser()
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:
        if path.is_dir():
            paths = _files(path)
            boundary = uuid.uuid4().hex
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
            fields = {"name": name, "replace": "true" if replace else "false"}
            r = client.post("/adapters", content=_progress_stream(paths, boundary, fields, progress),
                            headers=headers)
        else:
            r = client.post("/adapters", json={"name": name, "source": source, "replace": replace},
                            headers=headers)
    try:
        body = r.json()
    except json.JSONDecodeError:
        body = {"error": r.text}
    if r.status_code != 201:
        raise RegisterError(f"HTTP {r.status_code}: {body.get('error', body)}")
    return body


def run(args) -> int:
    record = register_adapter(args.url, args.name, args.source, args.token, args.replace, timeout=args.timeout)
    print(json.dumps(record, indent=2))
    return 0
