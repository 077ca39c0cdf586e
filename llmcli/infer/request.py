"""Reading an OpenAI API request (https://platform.openai.com/docs/api-reference): its JSON body, typed fields, chat
messages; what is wrong is an ApiError, answered as OpenAI answers it.
"""

import json

from starlette.requests import Request
from starlette.responses import JSONResponse

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
