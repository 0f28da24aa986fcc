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

from serve.app import openai_format as oai
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
    BestOfSequence,
    ChatCompletionRequest,
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
    registry: AdapterRegistry  # base-independent calls only: generation(), staging(), gc(), check()
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


def _wire_field(request: Request, r: ErrorReply) -> ErrorReply:
    """The engine names request fields as GenerationParams does (params.top_n_tokens); say them as the body
    the client sent names them (TGI: parameters.top_n_tokens; OpenAI: logprobs / top_logprobs, max_tokens...)."""
    if not r.field or not r.field.startswith("params."):
        return r
    path = request.url.path
    field = (oai.openai_field(r.field, chat=path.startswith("/v1/chat")) if _is_openai(request)
             else "parameters." + r.field[len("params."):])
    message = field + r.message[len(r.field):] if r.message.startswith(r.field) else r.message
    return ErrorReply(r.status, r.error_type, message, field=field, retry_after_s=r.retry_after_s)


def error_response(request: Request, r: ErrorReply) -> JSONResponse:
    r = _wire_field(request, r)
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


_TGI_OPTIONAL = ("repetition_penalty", "frequency_penalty", "presence_penalty", "typical_p", "top_n_tokens",
                 "min_new_tokens", "logit_bias", "num_beams", "length_penalty", "early_stopping",
                 "num_return_sequences", "no_repeat_ngram_size")


def _tgi_engine_request(req: TGIRequest, adapter: str | None, merged: dict | None = None) -> dict:
    p = req.parameters
    params = {"max_new_tokens": p.max_new_tokens, "do_sample": p.do_sample,
              "temperature": 1.0 if p.temperature is None else p.temperature,
              "top_p": 1.0 if p.top_p is None else p.top_p, "top_k": p.top_k or 0,
              "seed": p.seed, "stop": list(p.stop), "logprobs": p.details, "grammar": p.engine_grammar()}
    params.update({name: getattr(p, name) for name in _TGI_OPTIONAL if getattr(p, name) is not None})
    if p.best_of is not None:  # TGI: the best candidate answers, the others come back in details
        params["n"] = params["best_of"] = p.best_of
    if p.return_k_alternatives:
        params["top_n_tokens"] = max(p.top_n_tokens or 0, p.return_k_alternatives)
    return {"inputs": req.inputs, "adapter": adapter, "merged_adapters": merged, "request_id": uuid.uuid4().hex,
            "params": params}


def _tgi_adapter(req: TGIRequest, header_adapter: str | None) -> str | None:
    body_adapter = req.parameters.adapter_id
    if body_adapter and header_adapter and body_adapter != header_adapter:
        raise problem(422, f"parameters.adapter_id {body_adapter!r} disagrees with the X-Adapter-Id header "
                           f"{header_adapter!r}", field="parameters.adapter_id")
    return body_adapter or header_adapter or None


def _combination_details(result: dict) -> dict:
    return {"merged_adapters": result.get("adapters"), "merge_strategy": result.get("merge_strategy")}


def _with_alternatives(tokens: list[dict], tops: list | None) -> list[dict]:
    """LoRAX's form of the alternatives: on each token."""
    if not tops:
        return tokens
    return [{**t, "alternative_tokens": [{k: a[k] for k in ("id", "text", "logprob")} for a in alts]}
            for t, alts in zip(tokens, tops, strict=False)]


def tgi_response(result: dict, details: bool, alternatives: bool = False) -> TGIResponse:
    out = TGIResponse(generated_text=result["text"])
    if alternatives:
        result = {**result, "tokens": _with_alternatives(result["tokens"], result.get("top_tokens"))}
    if details:
        others = (result.get("sequences") or [])[1:]  # best_of's other candidates, beams' other returns
        out.details = TGIDetails(finish_reason=TGI_FINISH[result["finish_reason"]],
                                 prompt_tokens=result["prompt_tokens"],
                                 generated_tokens=result["generated_tokens"], seed=result.get("seed"),
                                 tokens=result["tokens"], top_tokens=result.get("top_tokens") or [],
                                 best_of_sequences=[BestOfSequence(
                                     generated_text=s["text"], finish_reason=TGI_FINISH[s["finish_reason"]],
                                     generated_tokens=s["generated_tokens"], seed=result.get("seed"),
                                     tokens=s["tokens"], top_tokens=s.get("top_tokens") or []) for s in others]
                                 or None, **_combination_details(result))
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
        event, held, held_top = first, None, None
        try:
            while True:
                if "token" in event and event.get("sequence", 0) != 0:
                    pass  # TGI streams one sequence: other returned beams come only in /generate's details
                elif "token" in event:
                    if held is not None:
                        yield sse({"token": held, "top_tokens": held_top, "generated_text": None, "details": None})
                    held, held_top = event["token"], event.get("top")
                elif "result" in event:
                    r = event["result"]
                    last = held or {"id": 0, "text": "", "logprob": None, "special": True}
                    yield sse({"token": last, "top_tokens": held_top, "generated_text": r["text"],
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
            if (req.parameters.best_of or 1) > 1:  # as TGI: the best candidate is known only at the end
                raise problem(422, "best_of > 1 cannot stream: the best candidate is known only when all have "
                                   "finished; use /generate", field="parameters.best_of")
            return await _tgi_stream(backend, engine_req, request)
        reply = await backend.generate(engine_req)
        if "error" in reply:
            return error_response(request, ErrorReply(**reply["error"]))
        out = tgi_response(reply["result"], req.parameters.details,
                           alternatives=bool(req.parameters.return_k_alternatives)).model_dump(exclude_none=False)
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


def _stops(req) -> list[str]:
    try:
        return req.stops
    except ValueError as e:
        raise problem(422, f"stop: {e}", field="stop") from None


def _add_openai_routes(app: FastAPI, backend: Backend) -> None:
    @app.post("/v1/completions", tags=["openai"], summary="OpenAI completions; model = adapter or base name")
    async def completions(req: CompletionRequest, request: Request, authorization: str | None = Header(None)):
        _generation_auth(backend, authorization)
        _stops(req)
        record, merged, versions = await _model_to_adapters(backend, req)
        adapter = None if record is None else record.name
        prompts = patterned_inputs(record, req.prompts, req.apply_pattern)
        want_lp = req.logprobs is not None
        params = oai.engine_params(req, req.max_tokens, want_lp, req.logprobs or 0, req.best_of)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            if len(req.prompts) != 1:
                raise problem(422, "stream=true supports one prompt per request", field="prompt")
            return await _openai_stream(backend, oai.engine_request(prompts[0], params, adapter, merged, versions),
                                        request, oai.completion_chunk(cid, created, req.model), req.stream_options)
        replies = await asyncio.gather(*(backend.generate(oai.engine_request(p, params, adapter, merged, versions))
                                         for p in prompts))
        for reply in replies:
            if "error" in reply:
                return error_response(request, ErrorReply(**reply["error"]))
        results = [r["result"] for r in replies]
        out = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
               "choices": oai.completion_choices(results, want_lp), "usage": oai.usage(results)}
        if merged is not None:  # extension: what the combination resolved to
            out.update(_combination_details(results[0]))
        return JSONResponse(out, headers=served_by(results[0]))

    @app.post("/v1/chat/completions", tags=["openai"],
              summary="OpenAI chat completions: messages rendered by the adapter's chat template (or FLAN-T5's)")
    async def chat_completions(req: ChatCompletionRequest, request: Request,
                               authorization: str | None = Header(None)):
        from adapters.chat_template import ChatTemplateError

        _generation_auth(backend, authorization)
        _stops(req)
        record, merged, versions = await _model_to_adapters(backend, req)
        adapter = None if record is None else record.name
        try:
            text = oai.chat_input([{"role": m.role, "content": m.text()} for m in req.messages], record)
        except ChatTemplateError as e:
            raise problem(422, str(e), field="messages") from None
        if not text:
            raise problem(422, "the messages render to an empty input; send some text", field="messages")
        [text] = patterned_inputs(record, [text], req.apply_pattern)
        params = oai.engine_params(req, req.new_tokens, req.logprobs, (req.top_logprobs or 0) if req.logprobs else 0)
        engine_req = oai.engine_request(text, params, adapter, merged, versions)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return await _openai_stream(backend, engine_req, request, oai.chat_chunk(cid, created, req.model),
                                        req.stream_options, chat=True)
        reply = await backend.generate(engine_req)
        if "error" in reply:
            return error_response(request, ErrorReply(**reply["error"]))
        result = reply["result"]
        out = {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
               "choices": oai.chat_choices(result, req.logprobs), "usage": oai.usage([result])}
        if merged is not None:
            out.update(_combination_details(result))
        return JSONResponse(out, headers=served_by(result))

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


async def _openai_stream(backend: Backend, engine_req: dict, request: Request, chunk, stream_options: dict | None,
                         chat: bool = False) -> Response:
    """SSE: one chunk per token (its output's index for n > 1), then each output's finish chunk, [DONE]."""
    events = backend.stream(engine_req)
    first = await anext(events)
    if "error" in first:
        return error_response(request, ErrorReply(**first["error"]))

    async def body():
        event = first
        try:
            while True:
                if "token" in event:
                    yield sse(chunk(event.get("sequence", 0), event["token"], event.get("top"), None))
                elif "result" in event:
                    result = event["result"]
                    for i, out in enumerate(oai.outputs_of(result)):
                        yield sse(chunk(i, None, None, OPENAI_FINISH[out["finish_reason"]]))
                    if (stream_options or {}).get("include_usage"):
                        last = chunk(0, None, None, None)
                        last["choices"], last["usage"] = [], oai.usage([result])
                        yield sse(last)
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
        return {**described["info"], "topology": cfg.topology, "replicas": await backend.replicas(),
                "registry": {"adapters": sum(by_kind.values()), "by_kind": by_kind,
                             "generation": backend.registry.generation(), **backend.registry.backends()},
                "http_limits": {"max_body_bytes": cfg.max_body_bytes, "max_upload_bytes": cfg.max_upload_bytes},
                "auth": {"admin": backend.admin_token is not None, "generation": backend.api_token is not None}}

    @app.get("/metrics", tags=["ops"], summary="Prometheus exposition of every replica (label `replica`)")
    async def metrics() -> Response:
        return Response(await backend.metrics_exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
