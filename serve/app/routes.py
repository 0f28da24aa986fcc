"""The HTTP API (FastAPI): TGI/LoRAX generation, OpenAI completions, adapter admin, health/info/metrics.

`build_api(backend)` is pure routing and validation; `backend` (serve/app/ingress.py) reaches the engine
replicas and the registry. OpenAPI docs are at /docs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve.app.admin_routes import add_admin_routes
from serve.app.auth import AuthError, check_bearer
from serve.app.config import AppConfig
from serve.app.http_errors import (
    ErrorReply,
    HTTPProblem,
    headers_for,
    openai_body,
    problem,
    reply_for,
    tgi_body,
)
from serve.app.http_util import BodyLimitMiddleware, HTTPMetricsMiddleware, sse
from serve.app.metrics import Metrics
from serve.app.patterns import patterned_inputs
from serve.app.schemas import (
    OPENAI_FINISH,
    TGI_FINISH,
    CompletionRequest,
    MergedAdaptersIn,
    TGIDetails,
    TGIRequest,
    TGIResponse,
)
from serve.registry import AdapterRegistry, RegistryError, check_name

ADAPTER_HEADER = "x-adapter-id"  # for clients without an adapter parameter (text-generation)


class Backend(Protocol):
    config: AppConfig
    registry: AdapterRegistry  # unbound: generation(), staging(), gc()
    http_in_flight: list[int]  # HTTP requests not yet answered (the middleware counts them)
    metrics: Metrics
    api_token: str | None
    admin_token: str | None

    async def generate(self, request: dict) -> dict: ...  # {"result": {...}} | {"error": ErrorReply dict}
    def stream(self, request: dict) -> AsyncIterator[dict]: ...  # {"token"}..., then {"result"} | {"error"}
    async def describe(self) -> dict: ...  # {"base": BaseDescription, "limits": AdapterLimits, "info": {...}}
    async def adapters(self) -> AdapterRegistry: ...  # the registry bound to the engine's base
    async def replicas(self) -> list[dict]: ...  # every engine replica's last report (node, sync, cache)
    async def metrics_exposition(self) -> bytes: ...


def build_api(backend: Backend) -> FastAPI:
    app = FastAPI(title="peftserve", version="0.1.0",
                  description="Multi-adapter FLAN-T5 serving: LoRA, (IA)3, BitFit and prompt-tuning adapters "
                              "chosen per request, sharing one continuous batch.")
    _add_error_handlers(app)
    _add_generation_routes(app, backend)
    _add_openai_routes(app, backend)
    add_admin_routes(app, backend)
    _add_ops_routes(app, backend)
    cfg = backend.config
    app.add_middleware(BodyLimitMiddleware, default_limit=cfg.max_body_bytes, upload_limit=cfg.max_upload_bytes)
    app.add_middleware(HTTPMetricsMiddleware, metrics=backend.metrics, in_flight=backend.http_in_flight)
    return app


# ---- errors --------------------------------------------------------------------------------------

def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def error_response(request: Request, r: ErrorReply) -> JSONResponse:
    body = openai_body(r) if _is_openai(request) else tgi_body(r)
    return JSONResponse(body, status_code=r.status, headers=headers_for(r))


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem):
        return error_response(request, exc.reply)

    @app.exception_handler(RegistryError)
    @app.exception_handler(AuthError)
    async def _typed(request: Request, exc: Exception):
        return error_response(request, reply_for(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid value")
        if first.get("type") == "json_invalid":
            field, msg = "body", f"malformed JSON: {first.get('ctx', {}).get('error', msg)}"
        more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
        return error_response(request, ErrorReply(422, "validation", f"{field}: {msg}{more}", field=field))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR:
            # FastAPI's reply when the body is not UTF-8 or nests too deep for json.loads: say so (422)
            return error_response(request, ErrorReply(422, "validation", "body: malformed JSON (not valid UTF-8, "
                                                      "or nested too deeply to parse)", field="body"))
        r = ErrorReply(exc.status_code, "too_large" if exc.status_code == 413 else "validation"
                       if exc.status_code < 500 else "internal", str(exc.detail))
        return error_response(request, r)


# ---- TGI / LoRAX ---------------------------------------------------------------------------------

def _generation_auth(backend: Backend, authorization: str | None) -> None:
    check_bearer(backend.api_token, authorization, "generation")


async def resolve_adapter(backend: Backend, name: str | None):
    """The adapter's registry record, or None for the base. A name must be well formed (400) and registered
    for this base (404, naming the base it is registered for, if another) before anything is queued."""
    if name is None:
        return None
    check_name(name)
    return (await backend.adapters()).get(name)


async def resolve_merged(backend: Backend, merged: MergedAdaptersIn | None, field: str) -> tuple[dict | None, dict]:
    """(engine merged_adapters, {id: version}) of a combination, each id checked like one adapter (400 / 404)
    before anything is queued; what they may be combined into is the engine's check, against the same
    registrations (422)."""
    if merged is None:
        return None, {}
    if merged.weights is not None and len(merged.weights) != len(merged.ids):
        raise problem(422, f"{len(merged.ids)} ids but {len(merged.weights)} weights; give one weight per id",
                      field=f"{field}.weights")
    versions = {name: (await resolve_adapter(backend, name)).version for name in merged.ids}
    return merged.engine_dict(), versions


def versions_of(record) -> dict:
    """{name: version} the ingress resolved: the replica serves at least that version (read-your-writes)."""
    return {} if record is None else {record.name: record.version}


def served_by(result: dict) -> dict[str, str]:
    """Which engine replica (and node) answered: response headers for operators and fault tests."""
    by = result.get("served_by") or {}
    return {k: str(v) for k, v in (("x-peftserve-replica", by.get("replica")), ("x-peftserve-node",
                                                                                   by.get("node_id"))) if v}


def _tgi_engine_request(req: TGIRequest, adapter: str | None, merged: dict | None = None) -> dict:
    p = req.parameters
    return {"inputs": req.inputs, "adapter": adapter, "merged_adapters": merged, "request_id": uuid.uuid4().hex,
            "params": {"max_new_tokens": p.max_new_tokens, "do_sample": p.do_sample,
                       "temperature": 1.0 if p.temperature is None else p.temperature,
                       "top_p": 1.0 if p.top_p is None else p.top_p, "top_k": p.top_k or 0,
                       "seed": p.seed, "stop": list(p.stop), "logprobs": p.details}}


def _tgi_adapter(req: TGIRequest, header_adapter: str | None) -> str | None:
    body_adapter = req.parameters.adapter_id
    if body_adapter and header_adapter and body_adapter != header_adapter:
        raise problem(422, f"parameters.adapter_id {body_adapter!r} disagrees with the X-Adapter-Id header "
                           f"{header_adapter!r}", field="parameters.adapter_id")
    return body_adapter or header_adapter or None


def _combination_details(result: dict) -> dict:
    return {"merged_adapters": result.get("adapters"), "merge_strategy": result.get("merge_strategy")}


def tgi_response(result: dict, details: bool) -> TGIResponse:
    out = TGIResponse(generated_text=result["text"])
    if details:
        out.details = TGIDetails(finish_reason=TGI_FINISH[result["finish_reason"]],
                                 prompt_tokens=result["prompt_tokens"],
                                 generated_tokens=result["generated_tokens"], seed=result.get("seed"),
                                 tokens=result["tokens"], **_combination_details(result))
    return out


async def _tgi_stream(backend: Backend, engine_req: dict, request: Request) -> Response:
    """Peek the first event so that errors before any token are real HTTP statuses, not 200 + SSE error."""
    events = backend.stream(engine_req)
    first = await anext(events)
    if "error" in first:
        return error_response(request, ErrorReply(**first["error"]))

    async def body():
        # TGI framing: one event per token; the last token's event also carries generated_text and
        # details, so each token is held back until we know whether it is the last one.
        event, held = first, None
        try:
            while True:
                if "token" in event:
                    if held is not None:
                        yield sse({"token": held, "generated_text": None, "details": None})
                    held = event["token"]
                elif "result" in event:
                    r = event["result"]
                    last = held or {"id": 0, "text": "", "logprob": None, "special": True}
                    yield sse({"token": last, "generated_text": r["text"],
                               "details": {"finish_reason": TGI_FINISH[r["finish_reason"]],
                                           "prompt_tokens": r["prompt_tokens"],
                                           "generated_tokens": r["generated_tokens"], "seed": r.get("seed"),
                                           **_combination_details(r)}})
                    return
                else:  # an error after tokens were sent: the TGI clients raise on an error payload
                    yield sse(tgi_body(ErrorReply(**event["error"])))
                    return
                event = await anext(events)
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_generation_routes(app: FastAPI, backend: Backend) -> None:
    async def run(req: TGIRequest, request: Request, authorization: str | None, x_adapter_id: str | None,
                  stream: bool, as_list: bool):
        _generation_auth(backend, authorization)
        merged, versions = await resolve_merged(backend, req.parameters.merged_adapters,
                                                "parameters.merged_adapters")
        name = _tgi_adapter(req, x_adapter_id)
        if merged is not None and name is not None:
            raise problem(422, "give either parameters.adapter_id (or X-Adapter-Id) or parameters.merged_adapters, "
                               "not both", field="parameters.merged_adapters")
        record = await resolve_adapter(backend, name)
        engine_req = _tgi_engine_request(req, name, merged)
        engine_req["versions"] = versions or versions_of(record)
        [engine_req["inputs"]] = patterned_inputs(record, [req.inputs], req.parameters.apply_pattern)
        if stream:
            return await _tgi_stream(backend, engine_req, request)
        reply = await backend.generate(engine_req)
        if "error" in reply:
            return error_response(request, ErrorReply(**reply["error"]))
        out = tgi_response(reply["result"], req.parameters.details).model_dump()
        return JSONResponse([out] if as_list else out, headers=served_by(reply["result"]))

    @app.post("/generate", response_model=TGIResponse, tags=["generation"],
              summary="Generate text (TGI/LoRAX schema); parameters.adapter_id picks the adapter")
    async def generate(req: TGIRequest, request: Request, authorization: str | None = Header(None),
                       x_adapter_id: str | None = Header(None)):
        return await run(req, request, authorization, x_adapter_id, stream=req.stream, as_list=False)

    @app.post("/generate_stream", tags=["generation"], summary="Generate with server-sent events per token")
    async def generate_stream(req: TGIRequest, request: Request, authorization: str | None = Header(None),
                              x_adapter_id: str | None = Header(None)):
        return await run(req, request, authorization, x_adapter_id, stream=True, as_list=False)

    @app.post("/", response_model=list[TGIResponse], tags=["generation"],
              summary="TGI compat: a one-element list, or SSE when stream=true (what the Python clients call)")
    async def compat(req: TGIRequest, request: Request, authorization: str | None = Header(None),
                     x_adapter_id: str | None = Header(None)):
        return await run(req, request, authorization, x_adapter_id, stream=req.stream, as_list=True)


# ---- OpenAI --------------------------------------------------------------------------------------

def _openai_engine_request(req: CompletionRequest, prompt: str, adapter: str | None,
                           merged: dict | None = None, versions: dict | None = None) -> dict:
    try:
        stops = req.stops
    except ValueError as e:
        raise problem(422, f"stop: {e}", field="stop") from None
    temperature = 1.0 if req.temperature is None else req.temperature
    return {"inputs": prompt, "adapter": adapter, "merged_adapters": merged, "request_id": uuid.uuid4().hex,
            "versions": versions or {}, "params": {"max_new_tokens": req.max_tokens, "do_sample": temperature > 0,
                       "temperature": temperature, "top_p": 1.0 if req.top_p is None else req.top_p,
                       "top_k": 0, "seed": req.seed, "stop": stops, "logprobs": bool(req.logprobs)}}


async def _model_to_adapters(backend: Backend, req: CompletionRequest) -> tuple[object | None, dict | None, dict]:
    """(the adapter's registry record, merged_adapters, {id: version}) for the engine. `model` is the base, an
    adapter, or adapters joined by '+' (equal weights, linear); with the `merged_adapters` extension, `model`
    is the base or those ids joined."""
    model = req.model
    base = (await backend.describe())["info"].get("base_name")
    if req.merged_adapters is not None:
        if model not in (base, "base", "+".join(req.merged_adapters.ids)):
            raise problem(422, f"model {model!r} and merged_adapters disagree; with merged_adapters, set model to the "
                               f"base ({base!r}) or to the ids joined by '+'", field="model")
        return None, *await resolve_merged(backend, req.merged_adapters, "merged_adapters")
    if model in (base, "base"):
        return None, None, {}
    if "+" in model:
        ids = model.split("+")
        if any(not i for i in ids):
            raise problem(422, f"model {model!r}: a combination is adapter names joined by '+', none empty",
                          field="model")
        return None, *await resolve_merged(backend, MergedAdaptersIn(ids=ids), "model")
    record = await resolve_adapter(backend, model)
    return record, None, versions_of(record)


def _openai_logprobs(result: dict) -> dict:
    toks = result["tokens"]
    return {"tokens": [t["text"] for t in toks], "token_logprobs": [t["logprob"] for t in toks],
            "top_logprobs": None, "text_offset": None}


def _add_openai_routes(app: FastAPI, backend: Backend) -> None:
    @app.post("/v1/completions", tags=["openai"], summary="OpenAI completions; model = adapter or base name")
    async def completions(req: CompletionRequest, request: Request, authorization: str | None = Header(None)):
        _generation_auth(backend, authorization)
        record, merged, versions = await _model_to_adapters(backend, req)
        adapter = None if record is None else record.name
        prompts = patterned_inputs(record, req.prompts, req.apply_pattern)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            if len(req.prompts) != 1:
                raise problem(422, "stream=true supports one prompt per request", field="prompt")
            return await _openai_stream(backend, _openai_engine_request(req, prompts[0], adapter, merged, versions),
                                        request, req.model, cid, created)
        replies = await asyncio.gather(*(backend.generate(_openai_engine_request(req, p, adapter, merged, versions))
                                         for p in prompts))
        for reply in replies:
            if "error" in reply:
                return error_response(request, ErrorReply(**reply["error"]))
        results = [r["result"] for r in replies]
        prompt_tokens = sum(r["prompt_tokens"] for r in results)
        completion_tokens = sum(r["generated_tokens"] for r in results)
        out = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
               "choices": [{"text": r["text"], "index": i, "finish_reason": OPENAI_FINISH[r["finish_reason"]],
                            "logprobs": _openai_logprobs(r) if req.logprobs is not None else None}
                           for i, r in enumerate(results)],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}}
        if merged is not None:  # extension: what the combination resolved to
            out.update(_combination_details(results[0]))
        return JSONResponse(out, headers=served_by(results[0]))

    @app.get("/v1/models", tags=["openai"], summary="The base model and every registered adapter")
    async def models(authorization: str | None = Header(None)):
        _generation_auth(backend, authorization)
        info = (await backend.describe())["info"]
        data = [{"id": info.get("base_name"), "object": "model", "created": 0, "owned_by": "peftserve",
                 "root": info.get("base_name"), "parent": None}]
        data += [{"id": r.name, "object": "model", "created": int(r.created_at), "owned_by": "peftserve",
                  "root": info.get("base_name"), "parent": info.get("base_name"), "kind": r.kind,
                  "version": r.version} for r in (await backend.adapters()).list()]
        return {"object": "list", "data": data}


async def _openai_stream(backend: Backend, engine_req: dict, request: Request, model: str, cid: str,
                         created: int) -> Response:
    events = backend.stream(engine_req)
    first = await anext(events)
    if "error" in first:
        return error_response(request, ErrorReply(**first["error"]))

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    async def body():
        event = first
        try:
            while True:
                if "token" in event:
                    yield sse(chunk(event["token"]["text"], None))
                elif "result" in event:
                    yield sse(chunk("", OPENAI_FINISH[event["result"]["finish_reason"]]))
                    break
                else:
                    yield sse(openai_body(ErrorReply(**event["error"])))
                    break
                event = await anext(events)
            yield sse("[DONE]")
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- health, info, metrics -----------------------------------------------------------------------

def _add_ops_routes(app: FastAPI, backend: Backend) -> None:
    @app.get("/health", tags=["ops"], summary="200 when the ingress, the registry and an engine replica answer")
    async def health() -> dict[str, Any]:
        try:
            await asyncio.wait_for(backend.describe(), timeout=10)
        except Exception as e:  # noqa: BLE001 - health reports, never raises
            return JSONResponse({"status": "unhealthy", "reason": f"{type(e).__name__}: {e}"}, status_code=503)
        try:  # a registry outage is degraded, not unhealthy: cached adapters keep serving
            await asyncio.to_thread(backend.registry.check)
        except RegistryError as e:
            return {"status": "degraded", "registry": "degraded", "reason": str(e)}
        return {"status": "ok"}

    @app.get("/info", tags=["ops"], summary="Base model, dtype, devices, limits, adapter counts")
    async def info(authorization: str | None = Header(None)) -> dict[str, Any]:
        _generation_auth(backend, authorization)
        described = await backend.describe()
        by_kind = await asyncio.to_thread((await backend.adapters()).counts, "kind")  # counted by the catalog
        cfg = backend.config
        return {**described["info"], "replicas": await backend.replicas(),
                "registry": {"adapters": sum(by_kind.values()), "by_kind": by_kind,
                             "generation": backend.registry.generation(), **backend.registry.backends()},
                "http_limits": {"max_body_bytes": cfg.max_body_bytes, "max_upload_bytes": cfg.max_upload_bytes},
                "auth": {"admin": backend.admin_token is not None, "generation": backend.api_token is not None}}

    @app.get("/metrics", tags=["ops"], summary="Prometheus exposition of every replica (label `replica`)")
    async def metrics() -> Response:
        return Response(await backend.metrics_exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
