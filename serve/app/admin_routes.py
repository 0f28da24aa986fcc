"""Adapter administration routes: register (server path, hub id, or multipart upload), list, get, delete.

Writes need the admin token when one is configured. A registration is validated against the base
(adapters.inspect_adapter, header-only) and committed to the shared catalog before the 201 is sent;
replicas compare the catalog generation on every request, so the next request anywhere sees it.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from fastapi import FastAPI, Header, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from serve.app.auth import check_admin, check_bearer, is_loopback
from serve.app.http_errors import problem
from serve.app.schemas import AdapterOut, RegisterRequest
from serve.registry import (
    CONFIG_FILE,
    WEIGHT_SUFFIX,
    AdapterRecord,
    AdapterRejected,
    AdapterTooLarge,
    check_name,
    redact_url,
)
from serve.registry.sources import fetch as fetch_remote
from serve.registry.sources import is_remote

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_UPLOAD_CHUNK = 1 << 20
MAX_UPLOAD_FILES = 16


def _out(r: AdapterRecord) -> dict:
    return AdapterOut(**{k: v for k, v in r.to_dict().items() if k != "path"}).model_dump()


def _looks_like_hub_id(source: str) -> bool:
    return (not source.startswith(("/", ".", "~")) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None
            and not os.path.exists(source))


def _fetch_from_hub(repo_id: str, into: Path) -> None:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=repo_id, local_dir=str(into), allow_patterns=[CONFIG_FILE, f"*{WEIGHT_SUFFIX}"])
    except Exception as e:  # noqa: BLE001 - any hub failure is the caller's to fix (offline, typo, private)
        raise AdapterRejected(f"could not fetch adapter {repo_id!r} from the Hugging Face hub "
                              f"({type(e).__name__}); register a local directory or upload the files") from None
    for extra in into.iterdir():  # hub metadata (.cache) is not part of the adapter
        if extra.is_dir():
            import shutil

            shutil.rmtree(extra)


async def _save_upload(part: UploadFile, dest_dir: Path, budget: int) -> int:
    name = os.path.basename(part.filename or "")
    if name.endswith(_PICKLE_SUFFIXES):
        raise AdapterRejected(f"{name}: pickled weights are never loaded; upload {CONFIG_FILE} and "
                              f"*{WEIGHT_SUFFIX} files")
    if not _FILE_NAME.match(name) or not (name == CONFIG_FILE or name.endswith(WEIGHT_SUFFIX)):
        raise AdapterRejected(f"unexpected upload file {part.filename!r}: an adapter is {CONFIG_FILE} plus "
                              f"*{WEIGHT_SUFFIX} files")
    n = 0
    with open(dest_dir / name, "xb") as f:
        while chunk := await part.read(_UPLOAD_CHUNK):
            n += len(chunk)
            if n > budget:
                raise AdapterTooLarge(f"upload is larger than the {budget}-byte limit")
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return n


def refuse_custom_code(path: Path) -> None:
    """A config that asks for custom code (auto_map, trust_remote_code) is refused at registration: the server
    never runs it, and an adapter that needs it would not mean what its author expects."""
    import json

    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # missing or malformed: inspect_adapter says so precisely
    asks = [k for k in ("auto_map", "trust_remote_code") if isinstance(config, dict) and config.get(k)]
    if asks:
        raise AdapterRejected(f"{CONFIG_FILE} sets {', '.join(asks)}: adapters with custom code are refused "
                              "(peftserve never imports code from an adapter); remove the key(s) and re-register")


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//|\\\\)|^\\\\")


def check_source(source: str) -> None:
    """Sources are a server directory, a hub id `org/name`, s3://bucket/prefix/ or an https:// archive;
    URLs of any other scheme are never fetched."""
    if _URL_SCHEME.match(source) and not is_remote(source):
        raise AdapterRejected(f"source {redact_url(source)!r} is a URL of an unsupported scheme: sources are a "
                              "directory on the server, a hub id 'org/name', s3://bucket/prefix/ or an https:// "
                              "URL of a .tar.gz/.zip archive; or upload the files as multipart/form-data")


def _client_host(request: Request) -> str | None:
    return request.client.host if request.client else None


def allowed_source(source: str, allowed_dirs: list[str] | None, client_host: str | None) -> Path:
    """The directory a server-path source names, resolved, if this server lets the caller read it.

    Resolution happens first, so a symlink or '..' cannot leave an allowed directory; the registry then
    copies from the resolved path (and refuses symlinked files inside it)."""
    if allowed_dirs is None:
        if not is_loopback(client_host):
            raise problem(403, f"server-path sources are accepted from loopback clients only (this request came "
                               f"from {client_host or 'an unknown peer'}); set allowed_source_dirs on the server, "
                               "or upload the files as multipart/form-data", field="source")
        return Path(source).expanduser().resolve()
    if not allowed_dirs:
        raise problem(403, "registering server paths is disabled on this server (allowed_source_dirs is empty); "
                           "upload the files as multipart/form-data instead", field="source")
    resolved = Path(source).expanduser().resolve()
    for d in allowed_dirs:
        if resolved == Path(d) or resolved.is_relative_to(d):
            return resolved
    raise problem(403, f"source {source!r} is outside the directories this server reads adapters from "
                       f"({', '.join(allowed_dirs)}); move it there or upload the files", field="source")


def make_validator(base, limits):
    """adapters.inspect_adapter against this server's base and limits, its errors as registry errors."""
    from adapters import AdapterError, AdapterLimitError, inspect_adapter

    def validate(path: Path):
        refuse_custom_code(path)
        try:
            return inspect_adapter(path, base, limits)
        except AdapterLimitError as e:
            raise (AdapterTooLarge if "bytes" in str(e) else AdapterRejected)(str(e)) from None
        except AdapterError as e:
            raise AdapterRejected(str(e)) from None

    return validate


def add_admin_routes(app: FastAPI, backend) -> None:

    def admin(request: Request, authorization: str | None, what: str) -> None:
        check_admin(backend.admin_token, authorization, what, _client_host(request),
                    backend.config.insecure_allow_open_admin)

    async def validator():
        described = await backend.describe()
        return make_validator(described["base"], described["limits"])

    async def register_json(request: Request):
        try:
            req = RegisterRequest.model_validate_json(await request.body())
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            if err["type"] == "json_invalid":
                raise problem(422, f"malformed JSON: {err['msg']}", field="body") from None
            raise problem(422, f"{field}: {err['msg']}", field=field) from None
        check_name(req.name)
        check_source(req.source)
        registry = await backend.adapters()
        validate = await validator()
        if is_remote(req.source):
            label = redact_url(req.source)

            def from_remote():
                with registry.staging() as staged:
                    fetch_remote(req.source, staged, registry.max_adapter_bytes)
                    return registry.register_staged(req.name, staged, validate, req.replace, label)
            return await asyncio.to_thread(from_remote)
        if _looks_like_hub_id(req.source):
            def from_hub():
                with registry.staging() as staged:
                    _fetch_from_hub(req.source, staged)
                    return registry.register_staged(req.name, staged, validate, req.replace, f"hub:{req.source}")
            return await asyncio.to_thread(from_hub)
        source_dir = allowed_source(req.source, backend.config.allowed_source_dirs, _client_host(request))
        return await asyncio.to_thread(registry.register, req.name, source_dir, validate, req.replace, req.source)

    async def register_upload(request: Request):
        form = await request.form(max_files=MAX_UPLOAD_FILES, max_fields=8)
        try:
            name = str(form.get("name") or "")
            check_name(name)
            replace = str(form.get("replace", "false")).lower() in ("1", "true", "yes")
            parts = [v for v in form.getlist("files") if isinstance(v, UploadFile)]
            if not parts:
                raise problem(422, "multipart upload needs one or more 'files' parts (adapter_config.json and "
                                   "*.safetensors)", field="files")
            registry = await backend.adapters()
            validate = await validator()
            with registry.staging() as staged:
                budget = registry.max_adapter_bytes
                for part in parts:
                    budget -= await _save_upload(part, staged, budget)
                return await asyncio.to_thread(registry.register_staged, name, staged, validate, replace,
                                               "upload")
        finally:
            await form.close()

    @app.post("/adapters", status_code=201, tags=["adapters"],
              summary="Register an adapter: JSON {name, source, replace} or multipart (name, replace, files)",
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": RegisterRequest.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["name", "files"], "properties": {
                      "name": {"type": "string"}, "replace": {"type": "boolean"},
                      "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def register(request: Request, authorization: str | None = Header(None)) -> dict:
        admin(request, authorization, "adapter registration")
        ctype = request.headers.get("content-type", "")
        try:
            if ctype.startswith("multipart/form-data"):
                record = await register_upload(request)
            elif ctype.startswith("application/json") or not ctype:
                record = await register_json(request)
            else:
                raise problem(415, f"unsupported content type {ctype!r}: send application/json or "
                                   "multipart/form-data")
        except Exception as e:
            backend.metrics.registrations.labels("register", type(e).__name__).inc()
            raise
        backend.metrics.registrations.labels("register", "ok").inc()
        return _out(record)

    @app.get("/adapters", tags=["adapters"], summary="Every registered adapter (latest version)")
    async def list_adapters(authorization: str | None = Header(None)) -> dict:
        check_bearer(backend.api_token, authorization, "reading the registry")
        registry = await backend.adapters()
        return {"adapters": [_out(r) for r in registry.list()], "generation": registry.generation()}

    @app.get("/adapters/{name:path}", tags=["adapters"], summary="One adapter's spec and version")
    async def get_adapter(name: str, authorization: str | None = Header(None)) -> dict:
        check_bearer(backend.api_token, authorization, "reading the registry")
        return _out((await backend.adapters()).get(name))

    @app.delete("/adapters/{name:path}", tags=["adapters"],
                summary="Remove an adapter: running requests finish, new ones get 404")
    async def delete_adapter(name: str, request: Request, authorization: str | None = Header(None)) -> dict:
        admin(request, authorization, "adapter deletion")
        try:
            record = await asyncio.to_thread((await backend.adapters()).delete, name)
        except Exception as e:
            backend.metrics.registrations.labels("delete", type(e).__name__).inc()
            raise
        backend.metrics.registrations.labels("delete", "ok").inc()
        return {"deleted": record.name, "version": record.version}
