"""A local, OpenAI-compatible server for a lillm model, and a chat page.

    python inference.py CKPT --serve                      # http://127.0.0.1:8000, the chat page at /
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
        -d '{"messages": [{"role": "user", "content": "Habari?"}], "stream": true}'

The protocol. OpenAI's HTTP API is the common tongue of local model servers (llama.cpp's
server, vLLM, ollama all speak it), so any OpenAI client, curl or a browser can use a lillm
model: `POST /v1/chat/completions` takes a list of messages (formatted by lillm's chat template,
lillm.tokenizer), `POST /v1/completions` takes raw text to continue, `GET /v1/models` names the
model. With `"stream": true` the reply comes as server-sent events (the WHATWG HTML standard's
`text/event-stream`): one `data: {json}` line and a blank line per piece of text, closed by
`data: [DONE]`, so a reader shows tokens as they are decoded.

One owner of the model. The HTTP threads only parse, check and tokenize; the decoding itself is
lillm/batching.py's engine (continuous batching over the slots of one KV cache, stop strings,
cancelled clients), which takes each checked request as a Job.

Checks first. Every request is validated before it is queued: bad JSON, an unknown field, a
wrong type, a prompt that does not fit the context, or absurd sampling values get a 4xx with an
OpenAI-style error body naming the field; the worker never sees a bad request. The server binds
to 127.0.0.1 unless told otherwise, bodies are bounded, POST bodies must be JSON (so a web page
on another site cannot post to it without a CORS preflight, which the server never grants).
"""
from __future__ import annotations

import errno
import json
import math
import queue
import select
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .batching import Engine, Job
from .errors import ChatTemplateError, FlagError, RequestError
from .generate import StaticDecoder
from .model import Transformer
from .tokenizer import Tokenizer, message_problem

CHAT_PAGE = Path(__file__).with_name("chat.html")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any context this model has holds as JSON
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stream_options",
                   "n", "user", "stop"}
MAX_STOPS = 4  # OpenAI's limit on stop strings
RETRY_AFTER_SECONDS = 1  # what a 503 (queue full) tells the client to wait
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt"}


# ----------------------------------------------------------------------------- requests
@dataclass
class Defaults:
    """Sampling values for fields a request leaves out (inference.py's flags)."""
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95


def parse_json_body(raw: bytes) -> dict:
    def no_constants(name):  # json accepts NaN and Infinity, which are not JSON and not a sampling value
        raise RequestError(f"the body contains {name}, which is not valid JSON")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise RequestError("the body is not UTF-8 text; send JSON encoded as UTF-8") from None
    except json.JSONDecodeError as error:
        raise RequestError(f"the body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}: this server accepts {', '.join(sorted(allowed))}",
                           param=unknown[0])


def _integer(body: dict, name: str, default, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)[:40]}", param=name)
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} must be {bounds}, got {value}", param=name)
    return value


def _number(body: dict, name: str, default, low: float, high: float, low_inclusive: bool = True):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)[:40]}", param=name)
    if value > high or value < low or (value == low and not low_inclusive):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}]"
        raise RequestError(f"{name} must be in {interval}, got {value}", param=name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json.dumps(value)[:40]}", param=name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    """stop: a string or a list of up to 4 non-empty strings (null: none)."""
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 0 < len(stops) <= MAX_STOPS \
            or not all(isinstance(one, str) and one for one in stops):
        raise RequestError(f"stop must be a non-empty string or a list of 1 to {MAX_STOPS} non-empty strings, got "
                           f"{json.dumps(stop)[:60]}", param="stop")
    return tuple(stops)


def _message_text(index: int, content) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) and set(part) == {"type", "text"}
                                         for part in content):
        return "".join(part["text"] for part in content)
    raise RequestError(f"messages[{index}].content must be a string (or a list of text parts); this model reads "
                       "text only", param=f"messages[{index}].content")


def chat_prompt(body: dict, tokenizer: Tokenizer) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}", param="messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} \
                or "role" not in message or "content" not in message:
            raise RequestError(f"messages[{index}] must be an object with role and content (and no other field "
                               "but name)", param=f"messages[{index}]")
        checked.append({"role": message["role"], "content": _message_text(index, message["content"])})
        problem = message_problem(index, checked[-1])  # the chat template's rule: its roles
        if problem is not None:
            raise RequestError(problem, param=f"messages[{index}].role")
    try:
        ids, _ = tokenizer.apply_chat_template(checked, add_generation_prompt=True)
    except (ChatTemplateError, ValueError) as error:  # e.g. a tokenizer without role tokens or <s>
        raise RequestError(f"{error}; use /v1/completions with a plain prompt instead", param="messages") from None
    return ids


def completion_prompt(body: dict, tokenizer: Tokenizer, vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None)
        if not ids:
            raise RequestError("prompt is empty and this tokenizer has no <s> to start from", param="prompt")
        return ids
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        return list(prompt)
    raise RequestError("prompt must be a string (or a non-empty list of token ids); one prompt per request",
                       param="prompt")


def parse_request(body: dict, kind: str, tokenizer: Tokenizer, context: int, vocab_size: int,
                  defaults: Defaults) -> Job:
    """Check a /v1/chat/completions (kind "chat") or /v1/completions ("text") body and make its Job."""
    _check_fields(body, CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS)
    if "model" in body and not isinstance(body["model"], str):
        raise RequestError("model must be a string", param="model")
    if "user" in body and not isinstance(body["user"], str):
        raise RequestError("user must be a string", param="user")
    _integer(body, "n", 1, 1, 1)  # one choice per request: send several requests for several answers
    stream = _flag(body, "stream")
    include_usage = False
    if body.get("stream_options") is not None:
        options = body["stream_options"]
        if not stream or not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError("stream_options must be {\"include_usage\": true|false}, with stream true",
                               param="stream_options")
        include_usage = _flag(options, "include_usage")
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, low_inclusive=False)
    top_k = _integer(body, "top_k", defaults.top_k, 1)
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    stop = _stops(body)
    prompt = chat_prompt(body, tokenizer) if kind == "chat" else completion_prompt(body, tokenizer, vocab_size)
    if len(prompt) >= context:
        raise RequestError(f"the prompt is {len(prompt)} tokens; this model's context is {context} tokens and "
                           "the reply needs at least one: shorten the prompt", param="messages" if kind == "chat"
                           else "prompt", code="context_length_exceeded")
    name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    # Up to the end of the context, as llama.cpp's server does: a client asking for more than fits
    # (many send a large fixed max_tokens) gets what fits and finish_reason "length".
    max_tokens = min(_integer(body, name, defaults.max_tokens, 1), context - len(prompt))
    return Job(prompt, max_tokens, temperature, top_p, top_k, seed, stream, include_usage, stop)


# ----------------------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    """One HTTP request, on its own thread: route, check, queue, then write the reply as it comes."""
    server_version = "lillm"
    timeout = 60  # seconds a client may take to send its request (a stalled client must not hold a thread)

    @property
    def app(self) -> ChatServer:
        return self.server.app

    # -- replies
    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        # 503: every slot is busy and the queue is full; Retry-After says when to come back (RFC 9110).
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 503 else None
        self._send_json(error.status, error.body(), headers)

    def log_message(self, format, *args):  # one JSON line per request instead of Apache's format
        self.app.log({"client": self.client_address[0], "request": format % args})

    # -- routes
    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = CHAT_PAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": self.app.model_name, "object": "model",
                                                              "created": self.app.started, "owned_by": "lillm"}]})
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(RequestError(f"no route GET {path}; try / , /v1/models", status=404))

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(path)
        try:
            if kind is None:
                raise RequestError(f"no route POST {path}; try /v1/chat/completions or /v1/completions", status=404)
            body = parse_json_body(self._read_body())
            job = self.app.parse(body, kind)
            self.app.engine.submit(job)
        except RequestError as error:
            self.close_connection = True
            return self._send_error(error)
        except Exception as error:  # noqa: BLE001 -- a bug: answer 500 and keep serving
            self.app.log({"error": f"{type(error).__name__}: {error}", "path": path})
            return self._send_error(RequestError(f"internal error: {type(error).__name__}: {error}", status=500,
                                                 kind="server_error"))
        reply = Reply(kind, self.app.model_name, len(job.prompt))
        if job.stream:
            self._stream(job, reply)
        else:
            self._answer(job, reply)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("chunked request bodies are not accepted; send Content-Length", status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("the request needs a Content-Length header", status=411)
        if not length.isdigit():
            raise RequestError(f"Content-Length {length!r} is not a byte count")
        size = int(length)
        if size > self.app.max_body:
            self._drain(size)
            raise RequestError(f"the body is {size} bytes; the limit is {self.app.max_body}", status=413)
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        body = self.rfile.read(size)
        if content_type != "application/json":
            raise RequestError(f"Content-Type is {content_type or 'missing'}; send the body as JSON with "
                               "'Content-Type: application/json'", status=415)
        return body

    def _drain(self, size: int) -> None:
        """Read (and drop) a refused body of a sane size, so the client sees our answer, not a reset."""
        left = size if size <= 16 * self.app.max_body else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _client_gone(self) -> bool:
        """Whether the client has closed its side: its socket reads as ready with nothing in it."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, job: Job):
        """The job's events as they come; an error if the worker thread is gone. A client that hangs
        up while it waits cancels its request (the engine frees its slot at the next step)."""
        while True:
            try:
                event = job.events.get(timeout=0.05)
            except queue.Empty:
                event = None
            if event is None or event[0] == "text":
                if self._client_gone():
                    job.cancelled.set()
                    return
            if event is None:
                if not self.app.engine.thread.is_alive():
                    yield ("error", "the generation thread has stopped; restart the server")
                    return
                continue
            yield event
            if event[0] in ("end", "error"):
                return

    def _answer(self, job: Job, reply: Reply) -> None:
        pieces = []
        for event in self._events(job):
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "end":
                return self._send_json(200, reply.whole("".join(pieces), event[1], event[2]))
            else:
                return self._send_error(RequestError(event[1], status=500, kind="server_error"))
        self.close_connection = True  # the client left before its answer

    def _stream(self, job: Job, reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self._event(reply.chunk(role=True))
            for event in self._events(job):
                if event[0] == "text":
                    self._event(reply.chunk(text=event[1]))
                elif event[0] == "end":
                    self._event(reply.chunk(finish_reason=event[1]))
                    if job.include_usage:
                        self._event(reply.usage_chunk(event[2]))
                else:
                    self._event(RequestError(event[1], status=500, kind="server_error").body())
            if job.cancelled.is_set():
                return  # the client left (seen while waiting): no [DONE] for nobody
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client left (a broken pipe, a reset) or stopped reading: stop its tokens
            job.cancelled.set()

    def _event(self, body: dict | None) -> None:
        if body is not None:
            self.wfile.write(b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n\n")


class Reply:
    """The OpenAI JSON shapes of one answer: whole (non-streaming) or as stream chunks."""

    def __init__(self, kind: str, model_name: str, prompt_tokens: int):
        self.kind, self.model_name, self.prompt_tokens = kind, model_name, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, streaming: bool) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        if streaming and self.kind == "chat":
            obj += ".chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(False), "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, text: str = "", role: bool = False, finish_reason: str | None = None) -> dict | None:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        elif role:
            return None  # completions have no role chunk
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict:
        return {**self._head(True), "choices": [], "usage": self.usage(completion_tokens)}


def listen(host: str, port: int) -> ThreadingHTTPServer:
    """The HTTP server bound to (host, port), or one line saying why it cannot be: a port out of range,
    one another program holds, a host name that does not resolve or is not this machine's."""
    if not 0 <= port <= 65535:
        raise FlagError(f"--port {port}: must be between 0 (any free port) and 65535")
    try:
        return ThreadingHTTPServer((host, port), Handler)
    except socket.gaierror as error:
        raise FlagError(f"--host {host}: cannot be resolved ({error.strerror}); use 127.0.0.1 (this machine "
                        "only) or an address of this machine") from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise FlagError(f"--port {port}: already in use on {host} (another server?); choose another --port, "
                            "or --port 0 for any free one") from None
        raise FlagError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); use 127.0.0.1 "
                        "and a port above 1023") from None


class ChatServer:
    """The HTTP server and its Engine. `start()` runs both on background threads (tests, notebooks);
    `serve_forever()` blocks (the command line); `close()` stops both."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, model_name: str = "lillm", host: str = "127.0.0.1",
                 port: int = 8000, defaults: Defaults | None = None, slots: int = 8, max_queue: int = 64,
                 max_body: int = MAX_BODY_BYTES, log: Callable[[dict], None] | None = None,
                 decoder: StaticDecoder | None = None):
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.defaults, self.max_body = defaults or Defaults(), max_body
        self.context, self.vocab_size = model.config.max_seq_len, model.config.vocab_size
        self.engine = Engine(self.model, tokenizer, slots, max_queue, decoder)
        self.engine.warm_up()  # a compiled step compiles here, before the first request (minutes on a CPU)
        self.log = log or (lambda record: print(json.dumps(record, ensure_ascii=False), file=sys.stderr, flush=True))
        self.started = int(time.time())
        self.httpd = listen(host, port)
        self.httpd.daemon_threads = True
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def parse(self, body: dict, kind: str) -> Job:
        return parse_request(body, kind, self.tokenizer, self.context, self.vocab_size, self.defaults)

    def start(self) -> ChatServer:
        self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="lillm-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.engine.start()
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.httpd.server_close()
            self.engine.stop()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.stop()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
