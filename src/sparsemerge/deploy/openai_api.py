"""The OpenAI API's shapes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``):
request validation and response bodies, free of HTTP (``server.py`` does the transport).

Supported request fields: ``model`` (a task, ``base``, or a combination ``0.5*a+0.5*b``),
``prompt`` (a string, a one-string list, or token ids) / ``messages``, ``max_tokens``
(``max_completion_tokens``), ``temperature`` (0..2; 0 = greedy), ``top_p``, ``stop``
(a string or up to 4), ``seed``, ``stream``, ``n`` (1 only). Other fields are ignored.
Errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    kind: str  # "completion" | "chat"
    model: str
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: Optional[int]
    stream: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8") if raw else "")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be a number in [{lo}, {hi}], got {value!r}", param=key)
    return float(value)


def parse_request(body: dict[str, Any], kind: str, check_model: Callable[[str], str],
                  encode: Callable[[str], list[int]], chat_prompt: Callable[[list], str], context: int,
                  vocab: int) -> GenRequest:
    """Validate a completion / chat request; ``check_model`` returns the canonical task key
    (raising ApiError 404 for an unknown one); ``context``: tokens of prompt + output."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a task name from GET /v1/models", param="model")
    model = check_model(model)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\": str, \"content\": str}", param="messages")
        ids = encode(chat_prompt(messages))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt" if kind != "chat" else "messages")
    if len(ids) >= context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has {len(ids)} tokens "
                       "and leaves no room for output", param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    room = context - len(ids)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = 16 if kind == "completion" else min(room, 512)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{key}' must be a positive integer, got {max_tokens!r}", param=key)
    if max_tokens > room:
        raise ApiError(400, f"this model's maximum context length is {context} tokens: {len(ids)} in the prompt + "
                       f"{max_tokens} to generate do not fit; ask for at most {room}", param=key,
                       code="context_length_exceeded")
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, f"only n=1 is supported, got {n!r}", param="n")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", param="stream")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "'top_p' must be > 0", param="top_p")
    return GenRequest(kind, model, ids, max_tokens, temperature, top_p, [s for s in stop if s], seed, stream)


def finish_reason(stop_reason: str) -> str:
    return "length" if stop_reason == "length" else "stop"


def models_body(names: list[str]) -> dict[str, Any]:
    now = int(time.time())
    return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "sparsemerge"} for n in names]}


def response_body(req: GenRequest, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        return {"id": f"chatcmpl-{req.id}", "object": "chat.completion", "created": req.created, "model": req.model,
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": req.created, "model": req.model,
            "choices": [choice], "usage": usage}


def chunk_body(req: GenRequest, piece: Optional[str], reason: Optional[str], first: bool = False) -> dict[str, Any]:
    """One server-sent event of a stream: a text piece, or (``reason``) the last one."""
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if piece:
            delta["content"] = piece
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"id": f"chatcmpl-{req.id}", "object": "chat.completion.chunk", "created": req.created,
                "model": req.model, "choices": [choice]}
    choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
    return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": req.created, "model": req.model,
            "choices": [choice]}


def simple_chat_prompt(messages: list) -> str:
    """A plain transcript for tokenizers without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
