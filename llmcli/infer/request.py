"""Reading an OpenAI API request (https://platform.openai.com/docs/api-reference): its JSON body, typed fields, chat
messages, sampling settings and prompts (`server` below is llm serve's Server); what is wrong is an ApiError,
answered as OpenAI answers it.
"""

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

from llmcli.errors import LLMError
from llmcli.infer.generate import apply_template
from llmcli.infer.rows import encode_prompt
from llmcli.infer.sampler import SamplingConfig, sampling_settings

MAX_BODY_BYTES = 1 << 20  # a larger request body gets 413


class ApiError(Exception):
    """An error answered to the client as OpenAI does: status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def read_body(request: Request) -> dict:
    """The request's JSON object; 413 past MAX_BODY_BYTES, 400 if it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def typed_field(body: dict, name: str, types, default=None, required: bool = False, low=None, high=None,
                low_open: bool = False):
    """body[name] checked: of the types (bool is not a number), within [low, high] (low excluded if low_open)."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        what = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
                dict: "an object"}
        names = " or ".join(what[t] for t in types if t is not int or float not in types)
        raise ApiError(400, f"'{name}' must be {names}, got {json.dumps(value)[:50]}", param=name,
                       code="invalid_type")
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{'' if low is None else low}, {'' if high is None else high}]"
        raise ApiError(400, f"'{name}' must be in {bounds}, got {value}", param=name, code="invalid_value")
    return value


def strings(body: dict, name: str) -> list[str]:
    """A required field that is a string or a non-empty array of strings (OpenAI's `prompt` and `input`), as a list."""
    value = typed_field(body, name, (str, list), required=True)
    values = [value] if isinstance(value, str) else value
    if not values or not all(isinstance(v, str) for v in values):
        raise ApiError(400, f"'{name}' must be a string or a non-empty array of strings", param=name,
                       code="invalid_type")
    return values


def chat_messages(body: dict) -> list[dict]:
    """The 'messages' of a chat completion request as {"role", "content": str} (text content parts joined); the
    `developer` role (OpenAI's newer name) is `system`."""
    messages = typed_field(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "'messages' must not be empty", param="messages", code="invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' of system, developer, user or "
                           "assistant",
                           param=f"messages[{i}].role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content",
                           code="invalid_type")
        messages[i] = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
    return messages


# fields of the OpenAI API that a local model cannot honour: a request that sets them gets a 400, not silence; the
# values that ask for nothing (a plain-text response, no tools) are accepted, as clients send them by default
UNSUPPORTED = {"suffix": (None,), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "best_of": (None, 1)}


def check_model(server, body: dict):
    """A single-model server answers any model name (LangChain sends gpt-3.5-turbo), or none, with its own model;
    the response's `model` says which."""
    typed_field(body, "model", str)


def logit_bias_field(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    value = typed_field(body, "logit_bias", dict)
    if not value:
        return None
    bias = {}
    for key, v in value.items():
        if not (key.isdigit() and int(key) < vocab_size and isinstance(v, (int, float)) and not isinstance(v, bool)
                and -100 <= v <= 100):
            raise ApiError(400, f"'logit_bias' maps token ids to numbers in [-100, 100], got {key!r}: {v!r}",
                           param="logit_bias", code="invalid_value")
        bias[int(key)] = float(v)
    return bias


def sampling(server, body: dict, chat: bool) -> tuple[SamplingConfig, int, int | None]:
    """The sampling config (unset fields: the checkpoint's defaults, as llm generate), n and seed of a request."""
    for name, nothing in UNSUPPORTED.items():
        if body.get(name) not in nothing:
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    max_tokens = typed_field(body, "max_tokens", int, low=0)
    if chat:
        max_tokens = typed_field(body, "max_completion_tokens", int, max_tokens, low=0)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a non-empty string or an array of them", param="stop", code="invalid_type")
    if stop is not None and len(stop) > 16:
        raise ApiError(400, "'stop' may hold at most 16 strings", param="stop", code="invalid_value")
    options = dict(
        max_new_tokens=max_tokens,
        temperature=typed_field(body, "temperature", (int, float), low=0, high=2),
        top_p=typed_field(body, "top_p", (int, float), low=0, high=1, low_open=True),
        top_k=typed_field(body, "top_k", int, low=0),
        min_p=typed_field(body, "min_p", (int, float), low=0, high=1),
        repetition_penalty=typed_field(body, "repetition_penalty", (int, float), low=0, low_open=True),
        presence_penalty=typed_field(body, "presence_penalty", (int, float), low=-2, high=2),
        frequency_penalty=typed_field(body, "frequency_penalty", (int, float), low=-2, high=2),
        logit_bias=logit_bias_field(body, server.engine.backend.config.vocab_size),
        ignore_eos=typed_field(body, "ignore_eos", bool),
    )
    cfg, _ = sampling_settings(server.config, server.chat_template if chat else None, server.tokenizer, **options)
    cfg.stop = tuple(cfg.stop) + tuple(stop or ())
    n = typed_field(body, "n", int, 1, low=1, high=server.engine.max_batch)
    seed = typed_field(body, "seed", int)
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(400, f"'seed' must be in [0, 2^63), got {seed}", param="seed", code="invalid_value")
    typed_field(body, "stream", bool, False)
    typed_field(body, "stream_options", dict)
    return cfg, n, seed


def encode(server, text: str, param: str) -> list[int]:
    try:
        return encode_prompt(server.tokenizer, text, server.context, truncate=False)
    except LLMError as e:
        raise ApiError(400, str(e).split("; shorten")[0], param=param, code="context_length_exceeded") from None


def completion_prompts(server, body: dict) -> list[tuple[list[int], str]]:
    """The token ids and text of each prompt: strings (in the checkpoint's prompt template, after the start-of-text
    token), or token ids as given (an array of integers, or an array of such arrays)."""
    value = body.get("prompt")
    if isinstance(value, list) and value and all(isinstance(v, list) or isinstance(v, int) and not isinstance(v, bool)
                                                 for v in value):
        lists = [value] if all(isinstance(v, int) for v in value) else value
        vocab = min(server.tokenizer.vocab_size, server.engine.backend.config.vocab_size)
        for ids in lists:
            if not (ids and isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                          and 0 <= t < vocab for t in ids)):
                raise ApiError(400, f"'prompt' as token ids must be non-empty arrays of integers in [0, {vocab})",
                               param="prompt", code="invalid_value")
            if len(ids) >= server.context:
                raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {server.context}",
                               param="prompt", code="context_length_exceeded")
        return [(ids, server.tokenizer.decode(ids)) for ids in lists]
    template = (server.config.get("generation") or {}).get("prompt_template", "{prompt}")
    texts = [apply_template(template, p) for p in strings(body, "prompt")]
    return [(encode(server, text, "prompt"), text) for text in texts]
