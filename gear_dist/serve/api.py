"""The OpenAI-compatible HTTP API over an engine: routes, SSE framing, errors, metrics.

``create_app(engine, ...)`` builds a FastAPI app for one replica; it only translates between
OpenAI bodies and :class:`LLMEngine` calls (and never does inference itself).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gear_dist.engine import LLMEngine, QueueFull, RequestOutput, SamplingParams
from gear_dist.engine.core import EngineError
from gear_dist.serve.metrics import ServerMetrics
from gear_dist.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body, new_id, now

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def _value_error(exc: ValueError) -> APIError:
    """Engine/parameter ValueErrors name their field first ("temperature: ..."): keep it as param."""
    message = str(exc)
    field = message.split(":", 1)[0] if ":" in message else None
    if field == "prompt" and ("exceed" in message or "more than" in message):
        return APIError(413, message, "invalid_request_error", "prompt", "context_length_exceeded")
    return APIError(400, message, "invalid_request_error", field)


def create_app(engine: LLMEngine, model_id: str, api_key: str | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    app = FastAPI(title="gear_dist", description="GEAR-compressed KV serving, OpenAI-compatible")
    metrics = metrics or ServerMetrics()
    tok = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(f"{param}: {first.get('msg', 'invalid request')}", "invalid_request_error",
                                       param), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
        if api_key and path.removeprefix(root).startswith("/v1/"):  # /health and /metrics stay open
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                metrics.requests.labels(request.url.path, "401").inc()
                return JSONResponse(error_body("invalid or missing API key", "authentication_error", None,
                                               "invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        metrics.observe_engine(engine.stats())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": now(), "owned_by": "gear_dist"}]}

    def sampling(body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if body.model != model_id:
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{model_id}'",
                           "invalid_request_error", "model", "model_not_found")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        try:
            return SamplingParams(max_tokens=max_tokens or 16, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, n=body.n, stop=stop, seed=body.seed, logprobs=logprobs,
                                  ignore_eos=body.ignore_eos)
        except ValueError as exc:
            raise _value_error(exc) from exc

    async def outputs(request: Request, prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's stream; refusals become HTTP errors, failures end the stream."""
        try:
            stream = engine.stream(prompt, params)
            first = await stream.__anext__()
        except ValueError as exc:
            raise _value_error(exc) from exc
        except QueueFull as exc:
            raise APIError(429, f"server busy: {exc}", "rate_limit_exceeded", None, "queue_full",
                           headers={"Retry-After": "1"}) from exc
        yield first
        async for out in stream:
            yield out

    async def complete(request: Request, prompt, params: SamplingParams, endpoint: str, render) -> JSONResponse:
        """Non-streaming: consume the stream, abandoning it (and freeing the request) if the
        client goes away first."""
        last: list[RequestOutput] = []

        async def consume():
            async for out in outputs(request, prompt, params):
                last[:] = [out]

        task = asyncio.ensure_future(consume())
        while not task.done():
            await asyncio.wait([task], timeout=0.1)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                metrics.requests.labels(endpoint, "499").inc()
                return JSONResponse(error_body("client disconnected", "client_closed"), status_code=499)
        try:
            task.result()
        except EngineError as exc:
            raise APIError(500, str(exc), "server_error") from exc
        out = last[0]
        observe(out)
        metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(render(out))

    def observe(out: RequestOutput) -> None:
        if out.ttft_s is not None:
            metrics.ttft.observe(out.ttft_s)
        metrics.tokens.inc(out.completion_tokens)

    def sse(request: Request, prompt, params: SamplingParams, endpoint: str, chunk, include_usage: bool):
        """Server-sent events: one chunk per new text, usage last if asked, then [DONE]."""
        rid, created = new_id("chatcmpl" if "chat" in endpoint else "cmpl"), now()
        sent, closed = [0] * params.n, [False] * params.n
        gen = outputs(request, prompt, params)

        async def events():
            start = time.monotonic()
            first_at, status = None, "200"
            try:
                async for out in gen:
                    for c in out.outputs:
                        new = c.text[sent[c.index]:]
                        if closed[c.index] or not (new or c.finish_reason):
                            continue
                        sent[c.index], closed[c.index] = len(c.text), c.finish_reason is not None
                        yield f"data: {json.dumps(chunk(rid, created, c.index, new, c.finish_reason))}\n\n"
                    if first_at is None and out.ttft_s is not None:
                        first_at = start + out.ttft_s
                    if out.finished:
                        observe(out)
                        if first_at and out.completion_tokens > 1:
                            metrics.tpot.observe((time.monotonic() - first_at) / (out.completion_tokens - 1))
                        if include_usage:
                            usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                                     "total_tokens": out.prompt_tokens + out.completion_tokens}
                            yield f"data: {json.dumps({'id': rid, 'object': 'chunk', 'created': created, 'model': model_id, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            except EngineError as exc:
                status = "500"
                yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
            except asyncio.CancelledError:  # the client went away: the engine stream aborts it
                status = "499"
                raise
            finally:
                metrics.requests.labels(endpoint, status).inc()
                await gen.aclose()

        return events

    async def streaming(request, prompt, params, endpoint, chunk, include_usage):
        events = sse(request, prompt, params, endpoint, chunk, include_usage)()
        first = await events.__anext__()  # refusals (4xx) surface here, before the 200 is sent

        async def body():
            yield first
            async for e in events:
                yield e

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def completion_logprobs(c) -> dict | None:
        if c.logprobs is None:
            return None
        pieces = [tok.decode([t.token_id]) for t in c.logprobs]
        offsets, pos = [], 0
        for p in pieces:
            offsets.append(pos)
            pos += len(p)
        return {"tokens": pieces, "token_logprobs": [t.logprob for t in c.logprobs],
                "top_logprobs": [{tok.decode([i]): lp for i, lp in t.top} for t in c.logprobs], "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = sampling(body, body.max_tokens, body.logprobs)
        endpoint = "/v1/completions"

        def chunk(rid, created, index, text, finish):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return await streaming(request, body.prompt, params, endpoint, chunk, include)

        def render(out: RequestOutput) -> dict:
            prefix = body.prompt if body.echo and isinstance(body.prompt, str) else ""
            return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model_id,
                    "choices": [{"index": c.index, "text": prefix + c.text, "logprobs": completion_logprobs(c),
                                 "finish_reason": c.finish_reason} for c in out.outputs],
                    "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                              "total_tokens": out.prompt_tokens + out.completion_tokens}}

        return await complete(request, body.prompt, params, endpoint, render)

    def chat_logprobs(c) -> dict | None:
        if c.logprobs is None:
            return None
        entry = lambda i, lp: {"token": tok.decode([i]), "logprob": lp, "bytes": list(tok.decode([i]).encode())}  # noqa: E731
        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in c.logprobs]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, body.max_completion_tokens or body.max_tokens, top)
        try:
            prompt = tok.apply_chat_template([m.model_dump() for m in body.messages], add_generation_prompt=True,
                                             tokenize=False)
        except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: {exc}", "invalid_request_error", "messages") from exc
        ids = tok(prompt, add_special_tokens=False).input_ids
        endpoint = "/v1/chat/completions"

        def chunk(rid, created, index, text, finish):
            delta = {"role": "assistant", "content": text} if text else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return await streaming(request, ids, params, endpoint, chunk, include)

        def render(out: RequestOutput) -> dict:
            return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model_id,
                    "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                                 "logprobs": chat_logprobs(c), "finish_reason": c.finish_reason} for c in out.outputs],
                    "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                              "total_tokens": out.prompt_tokens + out.completion_tokens}}

        return await complete(request, ids, params, endpoint, render)

    return app
