"""`llm serve`: the OpenAI HTTP API (completions, chat completions, embeddings, models) over one model.

Starlette routes the requests and uvicorn speaks HTTP; every request's generation runs in the continuous-batching
engine (llmcli/infer/engine.py), whose thread owns the model. Requests and responses follow the OpenAI API reference
(https://platform.openai.com/docs/api-reference): streamed responses are server-sent events, one chunk a piece of
text, then `data: [DONE]`; errors are {"error": {"message", "type", "param", "code"}} with the HTTP status.
"""

import asyncio
import base64
import hmac
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llmcli.errors import LLMError
from llmcli.infer.engine import Engine, Job, QueueFull
from llmcli.infer.logprobs import MOST_ALTERNATIVES, chat_logprobs, completion_logprobs, prompt_scores
from llmcli.infer.request import (ApiError, chat_messages, check_model, completion_prompts, encode, read_body, sampling,
                                  strings, typed_field)
from llmcli.infer.sampler import SamplingConfig
from llmcli.runtime import available_cores

RETRY_AFTER_S = 1  # told to a client turned away because the queue is full


def _chat_prompt(template, messages: list[dict]) -> str:
    """The prompt for a conversation, rendered with the model's chat template (llmcli/text/chat_template.py);
    without a template, the messages as plain text, a line each."""
    from llmcli.infer.chat import plain_text

    return plain_text(messages) if template is None else template.prompt(messages)


@dataclass
class Server:
    """What the routes share: the model's name and files' settings, the tokenizer, the engine."""
    model_id: str
    config: dict  # the checkpoint's config.yaml
    tokenizer: object
    engine: Engine
    api_key: str | None = None
    log: object = print
    chat_template: object = None  # the model's ChatTemplate (llmcli/text/chat_template.py), or None

    @property
    def context(self) -> int:
        return self.engine.context


# --- reading requests ----------------------------------------------------------------------------------------------

# --- running requests ----------------------------------------------------------------------------------------------

class Pending:
    """A job submitted to the engine, its events arriving on this event loop."""

    def __init__(self, server: Server, prompts: list[list[int]], cfg: SamplingConfig, n: int, seed: int | None,
                 logprobs: int | None = None):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.server = server
        self.job = Job(prompts, cfg, lambda events: loop.call_soon_threadsafe(self.queue.put_nowait, events), n, seed,
                       logprobs=logprobs)
        self.texts = [""] * self.job.rows
        self.scores: list[list] = [[] for _ in range(self.job.rows)]  # the scored new tokens, if logprobs
        self.finish: list[str | None] = [None] * self.job.rows
        self.completion_tokens = 0
        try:
            server.engine.submit(self.job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry in {RETRY_AFTER_S} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n", code="invalid_value") from None

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def events(self):
        """Yield lists of (choice, text, finish_reason or None, scored tokens) as the engine produces them, until
        every choice finished: all that arrived since the last (a slow client gets fewer, larger pieces)."""
        while not self.done:
            batch = await self.queue.get()
            while not self.queue.empty():
                batch += self.queue.get_nowait()
            out = []
            for event in batch:
                if event[0] == "error":
                    raise RuntimeError(event[1])
                if event[0] == "text":
                    self.texts[event[1]] += event[2]
                    self.scores[event[1]] += event[3]
                    out.append((event[1], event[2], None, event[3]))
                else:
                    self.finish[event[1]] = event[2]
                    self.completion_tokens += event[3]
                    out.append((event[1], "", event[2], []))
            yield out

    def cancel(self):
        if not self.done:
            self.server.engine.cancel(self.job)

    def usage(self) -> dict:
        prompt_tokens = sum(map(len, self.job.prompts))
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens}


async def _until_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, pending: Pending):
    """Wait for every choice of a request; a client that disconnects cancels it."""
    async def run():
        async for _ in pending.events():
            pass

    work, watch = asyncio.ensure_future(run()), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            pending.cancel()
    if not work.done() or work.cancelled():
        raise ApiError(499, "the client disconnected", code="client_disconnected")
    work.result()  # raises the engine's error


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _stream(server: Server, request: Request, pending: Pending, chunk, include_usage: bool, started: float):
    """A streaming response: a chunk(choice, text, finish_reason, scored tokens) event a piece of text, usage, then
    [DONE]; chunk(choice, None, None, None) is a choice's first (None: none)."""
    async def events():
        status = 200
        try:
            for choice in range(pending.job.rows):
                first = chunk(choice, None, None, None)
                if first is not None:
                    yield _sse(first)
            async for batch in pending.events():
                yield "".join(_sse(chunk(*event)) for event in batch)
            if include_usage:
                yield _sse({**chunk(0, "", None, []), "choices": [], "usage": pending.usage()})
            yield "data: [DONE]\n\n"
        except RuntimeError as e:  # the request failed in the engine (logged there)
            status = 500
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        except asyncio.CancelledError:  # the client disconnected
            status = 499
            raise
        finally:
            pending.cancel()
            _log_request(server, request, status, started, pending)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _log_request(server: Server, request: Request, status: int, started: float, pending: Pending | None = None):
    tokens = ""
    if pending is not None:
        usage = pending.usage()
        tokens = f" {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens"
    client = f"{request.client.host}:{request.client.port}" if request.client else "-"
    server.log(f"{client} {request.method} {request.url.path} {status}{tokens} {time.perf_counter() - started:.3f}s")


# --- the routes ----------------------------------------------------------------------------------------------------

async def completions(request: Request):
    server: Server = request.app.state.server
    body = await read_body(request)
    check_model(server, body)
    prompts = completion_prompts(server, body)
    cfg, n, seed = sampling(server, body, chat=False)
    top = typed_field(body, "logprobs", int, None, low=0, high=MOST_ALTERNATIVES)
    echoed = None
    if typed_field(body, "echo", bool, False):
        if n > 1:
            raise ApiError(400, "'echo' works with n = 1 only", param="echo", code="invalid_value")
        echoed = [(text, await _prompt_scores(server, ids, top)) for ids, text in prompts]
    pending = Pending(server, [ids for ids, _ in prompts], cfg, n, seed, top)
    return await _respond(request, body, pending, chat=False, echoed=echoed)


async def _prompt_scores(server: Server, ids: list[int], top: int | None) -> list[tuple] | None:
    """The prompt's scored tokens (echo), from a forward pass on the engine's thread; None without logprobs."""
    if top is None:
        return None
    logits = await asyncio.wrap_future(server.engine.call(lambda: server.engine.backend.all_logits(ids)))
    return prompt_scores(logits, ids, top)


async def chat_completions(request: Request):
    server: Server = request.app.state.server
    body = await read_body(request)
    check_model(server, body)
    messages = chat_messages(body)
    cfg, n, seed = sampling(server, body, chat=True)
    top = typed_field(body, "top_logprobs", int, None, low=0, high=MOST_ALTERNATIVES)
    if top is not None and not body.get("logprobs"):
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    top = (top or 0) if typed_field(body, "logprobs", bool, False) else None
    try:
        prompt = _chat_prompt(server.chat_template, messages)
    except LLMError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    pending = Pending(server, [encode(server, prompt, "messages")], cfg, n, seed, top)
    return await _respond(request, body, pending, chat=True)


def _logprobs(server: Server, pending: Pending, chat: bool, scores: list, offset: int = 0) -> dict | None:
    if pending.job.logprobs is None:
        return None
    if chat:
        return chat_logprobs(server.tokenizer, scores)
    return completion_logprobs(server.tokenizer, scores, offset)


async def _respond(request: Request, body: dict, pending: Pending, chat: bool, echoed: list | None = None):
    """The response to a (chat) completion request, streamed or not; echoed: each prompt's (text, scored tokens or
    None) to put before its choice's text (completions' echo, n = 1)."""
    server: Server = request.app.state.server
    started = request.state.started
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": server.model_id}
    echo_text = [text for text, _ in echoed] if echoed else [""] * pending.job.rows
    echo_scores = [scores or [] for _, scores in echoed] if echoed else [[] for _ in range(pending.job.rows)]
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        offsets = list(map(len, echo_text))  # completions' text_offset: characters sent so far, a choice

        def chunk(choice, text, finish, scores):
            if chat:
                if text is None:  # the first chunk of a choice: its role
                    delta, logprobs = {"role": "assistant", "content": ""}, None
                else:
                    delta = {"content": text} if text else {}
                    logprobs = _logprobs(server, pending, chat, scores) if scores else None
                return {**head, "choices": [{"index": choice, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish}]}
            if text is None:  # the first chunk of a choice: the echoed prompt, if any
                if not echoed:
                    return None
                text, scores, offset = echo_text[choice], echo_scores[choice], 0
            else:
                offset, offsets[choice] = offsets[choice], offsets[choice] + len(text)
            logprobs = _logprobs(server, pending, chat, scores, offset) if scores else None
            return {**head, "choices": [{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        return _stream(server, request, pending, chunk, include_usage, started)
    try:
        await _collect(request, pending)
    except RuntimeError as e:
        raise ApiError(500, str(e), type="server_error") from None
    choices = []
    for i, (text, finish, scores) in enumerate(zip(pending.texts, pending.finish, pending.scores)):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": _logprobs(server, pending, chat, scores), "finish_reason": finish})
        else:
            choices.append({"index": i, "text": echo_text[i] + text, "finish_reason": finish,
                            "logprobs": _logprobs(server, pending, chat, echo_scores[i] + scores)})
    request.state.pending = pending
    return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                         "usage": pending.usage()})


async def embeddings(request: Request):
    server: Server = request.app.state.server
    body = await read_body(request)
    check_model(server, body)
    texts = strings(body, "input")
    if len(texts) > 2048:
        raise ApiError(400, "'input' may hold at most 2048 texts", param="input", code="invalid_value")
    encoding = typed_field(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be float or base64", param="encoding_format",
                       code="invalid_value")
    if body.get("dimensions") is not None:
        raise ApiError(400, "'dimensions' is not supported", param="dimensions", code="unsupported_parameter")
    from llmcli.eval.embed import embed_texts

    tokenizer = server.tokenizer
    start = 1 if tokenizer.start_of_text is not None else 0
    counts = [min(start + len(ids), server.context) for ids in tokenizer.encode_batch(texts)]
    vectors = await asyncio.wrap_future(server.engine.call(
        lambda: embed_texts(server.engine.model, tokenizer, texts, "mean")))
    data = []
    for i, v in enumerate(vectors):
        value = base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"object": "list", "data": data, "model": server.model_id,
                         "usage": {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}})


async def models(request: Request):
    server: Server = request.app.state.server
    return JSONResponse({"object": "list", "data": [
        {"id": server.model_id, "object": "model", "created": int(request.app.state.started), "owned_by": "llmcli"}]})


async def health(request: Request):
    return JSONResponse({"status": "ok", **request.app.state.server.engine.busy()})


# --- the application -----------------------------------------------------------------------------------------------

def create_app(server: Server) -> Starlette:
    """The ASGI application; its lifespan starts and stops server.engine."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)  # after uvicorn finished the requests in flight

    async def not_found(request, exc: HTTPException):
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                        code="not_found" if exc.status_code == 404 else None).response()

    routes = [Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/health", health)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found})
    app.state.server, app.state.started = server, time.time()
    app.add_middleware(_Guard, server=server)
    return app


class _Guard:
    """ASGI middleware: the API key, the OpenAI-style answer to errors, and a log line a request."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        started = time.perf_counter()
        scope.setdefault("state", {})["started"] = started
        status = 500
        streaming = False

        async def send_and_see(message):
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in message.get("headers", []))
            await send(message)

        try:
            if self.server.api_key is not None and scope["path"] != "/health":
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.server.api_key}".encode()):
                    raise ApiError(401, "a valid API key is required: 'Authorization: Bearer KEY'",
                                   type="authentication_error", code="invalid_api_key")
            await self.app(scope, receive, send_and_see)
        except ApiError as e:
            if e.status == 499:  # nobody to answer
                status = 499
            else:
                status = e.status
                await e.response()(scope, receive, send)
        except Exception:
            import traceback

            self.server.log(traceback.format_exc().rstrip())
            status = 500
            await ApiError(500, "the server failed on this request (logged)", type="server_error").response()(
                scope, receive, send)
        if not streaming:  # a stream logs itself when it ends
            _log_request(self.server, request, status, started, scope["state"].get("pending"))


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise LLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve(model_path=None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 64, quantize: str | None = None):
    """Load the model, listen, print the address on stdout, serve until SIGTERM or Ctrl-C, then finish the
    requests in flight and return."""
    import signal
    from pathlib import Path

    import torch
    import uvicorn

    from llmcli.formats import default_model_path, load_model
    from llmcli.progress import log
    from llmcli.text.chat_template import find_chat_template

    if max_batch < 1:
        raise LLMError("--max-batch must be at least 1")
    if max_queue < 0:
        raise LLMError("--max-queue must be at least 0")
    if not 0 <= port < 65536:
        raise LLMError(f"--port must be in 0..65535, got {port}")
    sock = _bind(host, port)  # before loading: a port in use is said at once
    # the engine's thread computes, the event loop's serves HTTP: leave the loop a core
    if "OMP_NUM_THREADS" not in os.environ:  # (a number the user exported is kept)
        torch.set_num_threads(max(1, available_cores() - 1))
    model, tokenizer, config = load_model(model_path, quantize=quantize)
    if config.get("task") == "classify":
        raise LLMError("this checkpoint is a classifier: it labels text (llm classify), it does not generate")
    name = Path(model_path or default_model_path()).resolve().name

    def log_line(message: str):
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    engine = Engine(model, tokenizer, max_batch, max_queue, log=log_line)
    template = find_chat_template(model_path or default_model_path(), config, tokenizer)
    server = Server(name, config, tokenizer, engine, api_key or None, log_line, template)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    log(f"serving {name} (context {engine.context} tokens), {max_batch} sequences decoding at once at most; "
        "SIGTERM or Ctrl-C stops it")
    print(f"http://{shown}:{bound[1]}/v1", flush=True)
    # uvicorn finishes the requests in flight on SIGTERM/SIGINT, then raises the signal again for the handler that
    # was there before it: this one, so that a stop that went as planned exits 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None)
    uvicorn.Server(config).run(sockets=[sock])
    log("stopped")
