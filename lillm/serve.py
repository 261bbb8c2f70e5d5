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

One owner of the model. Generation mutates the model: `setup_cache` hangs a KV cache on every
attention layer and `clear_cache` removes it, so two threads generating at once would write into
each other's caches and mix their answers. Here the HTTP threads only parse, check and tokenize;
a single worker thread (`Engine`) owns the model and takes requests from a bounded queue, and
each request gets its tokens back through a queue of its own.

Batching. Decoding one token for 8 rows costs little more than for 1 on a CPU or GPU (each step
reads every weight once either way), which is why servers batch (Yu et al., 2022, "Orca", batch
continuously at each step; vLLM, Kwon et al., 2023, adds paged caches). We do the simplest form,
static batching: the greedy requests waiting when the worker is free run as one left-padded batch
(lillm.generate masks the padding and counts positions per row, so each row decodes as it would
alone), and a row that reaches its own max_tokens or `</s>` simply stops being reported. The
worker waits `batch_window` (20 ms) after a greedy request for others sent at the same moment; a
request arriving while a batch runs waits for that batch to finish (continuous batching would let
it join at the next step, at the price of per-row cache positions). Sampled
requests run one at a time, so a request's seed reproduces its answer whatever else is queued.

Checks first. Every request is validated before it is queued: bad JSON, an unknown field, a
wrong type, a prompt that does not fit the context, or absurd sampling values get a 4xx with an
OpenAI-style error body naming the field; the worker never sees a bad request. The server binds
to 127.0.0.1 unless told otherwise, bodies are bounded, POST bodies must be JSON (so a web page
on another site cannot post to it without a CORS preflight, which the server never grants).
"""
from __future__ import annotations

import json
import math
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import ChatTemplateError, LillmError
from .generate import generate_stream
from .model import Transformer
from .tokenizer import ROLES, Tokenizer

CHAT_PAGE = Path(__file__).with_name("chat.html")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any context this model has holds as JSON
SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stream_options",
                   "n", "user"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt"}


class RequestError(LillmError):
    """A request the server refuses, with the HTTP status and the OpenAI error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- requests
@dataclass
class Job:
    """One checked request: its prompt ids and sampling options, and the queue its text comes back on.

    events receives ("text", piece) as text is decoded, then ("end", finish_reason, completion_tokens)
    or ("error", message). cancelled is set by the HTTP thread when the client goes away.
    """
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stream: bool = False
    include_usage: bool = False
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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
        if message["role"] not in ROLES:
            raise RequestError(f"messages[{index}].role is {json.dumps(message['role'])[:40]}; the roles are "
                               f"{', '.join(ROLES)}", param=f"messages[{index}].role")
        checked.append({"role": message["role"], "content": _message_text(index, message["content"])})
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
    prompt = chat_prompt(body, tokenizer) if kind == "chat" else completion_prompt(body, tokenizer, vocab_size)
    if len(prompt) >= context:
        raise RequestError(f"the prompt is {len(prompt)} tokens; this model's context is {context} tokens and "
                           "the reply needs at least one: shorten the prompt", param="messages" if kind == "chat"
                           else "prompt", code="context_length_exceeded")
    room = context - len(prompt)
    name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, name, None, 1)
    if max_tokens is None:
        max_tokens = min(defaults.max_tokens, room)
    elif max_tokens > room:
        raise RequestError(f"{name} is {max_tokens}, but the prompt is {len(prompt)} tokens and the context "
                           f"{context}: at most {room} new tokens fit", param=name, code="context_length_exceeded")
    return Job(prompt, max_tokens, temperature, top_p, top_k, seed, stream, include_usage)


# ----------------------------------------------------------------------------- the worker
class TextStream:
    """Turns one row's token ids into text pieces. Decoding the whole row and sending the new suffix
    keeps multi-byte characters whole (a byte-level token may hold half of one)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def piece(self, token: int | None = None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:  # wait for the rest of a split character
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


class Engine:
    """The one thread that runs the model: requests queue up, greedy ones waiting together are batched."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 batch_window: float = 0.02):
        self.model, self.tokenizer, self.max_batch, self.batch_window = model, tokenizer, max_batch, batch_window
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.batch_sizes: Counter[int] = Counter()  # how many model runs had each batch size
        self.thread = threading.Thread(target=self._run, name="lillm-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError("the server has too many requests waiting; retry shortly", status=503,
                               kind="server_error", code="overloaded") from None

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            waiting, stop = [first], False
            # Requests sent together reach the queue a few milliseconds apart: wait that long for them.
            deadline = time.monotonic() + (self.batch_window if first.greedy else 0.0)
            while len(waiting) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                waiting.append(job)
            greedy = [job for job in waiting if job.greedy]
            for group in ([greedy] if greedy else []) + [[job] for job in waiting if not job.greedy]:
                self._generate(group)
            if stop:
                return

    def _generate(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        self.batch_sizes[len(jobs)] += 1
        eos = self.tokenizer.eos_id
        options = jobs[0]  # a batch is all greedy, or a single request
        streams = [TextStream(self.tokenizer) for _ in jobs]
        counts, open_rows = [0] * len(jobs), set(range(len(jobs)))
        steps = generate_stream(self.model, [job.prompt for job in jobs], max(job.max_tokens for job in jobs),
                                temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
                                eos_id=eos, pad_id=self.tokenizer.pad_id or 0, seed=options.seed)
        try:
            for step_tokens in steps:
                for row, token in enumerate(step_tokens.tolist()):
                    if row not in open_rows:
                        continue
                    job = jobs[row]
                    if job.cancelled.is_set():
                        open_rows.discard(row)
                        continue
                    counts[row] += 1
                    stopped = eos is not None and token == eos
                    piece = streams[row].piece(token, final=stopped or counts[row] == job.max_tokens)
                    if piece:
                        job.events.put(("text", piece))
                    if stopped or counts[row] == job.max_tokens:
                        job.events.put(("end", "stop" if stopped else "length", counts[row]))
                        open_rows.discard(row)
                if not open_rows:
                    break
        except Exception as error:  # noqa: BLE001 -- a bug or out of memory: fail these requests, keep serving others
            for row in open_rows:
                jobs[row].events.put(("error", f"generation failed: {type(error).__name__}: {error}"))
        finally:
            steps.close()  # generate_stream's finally frees the KV cache


# ----------------------------------------------------------------------------- HTTP
class Handler(BaseHTTPRequestHandler):
    """One HTTP request, on its own thread: route, check, queue, then write the reply as it comes."""
    server_version = "lillm"
    timeout = 60  # seconds a client may take to send its request (a stalled client must not hold a thread)

    @property
    def app(self) -> ChatServer:
        return self.server.app

    # -- replies
    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, error.body())

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

    def _events(self, job: Job):
        """The job's events as they come; an error if the worker thread is gone."""
        while True:
            try:
                event = job.events.get(timeout=1.0)
            except queue.Empty:
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


class ChatServer:
    """The HTTP server and its Engine. `start()` runs both on background threads (tests, notebooks);
    `serve_forever()` blocks (the command line); `close()` stops both."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, model_name: str = "lillm", host: str = "127.0.0.1",
                 port: int = 8000, defaults: Defaults | None = None, max_batch: int = 8, max_queue: int = 64,
                 max_body: int = MAX_BODY_BYTES, log: Callable[[dict], None] | None = None):
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.defaults, self.max_body = defaults or Defaults(), max_body
        self.context, self.vocab_size = model.config.max_seq_len, model.config.vocab_size
        self.engine = Engine(self.model, tokenizer, max_batch, max_queue)
        self.log = log or (lambda record: print(json.dumps(record, ensure_ascii=False), file=sys.stderr, flush=True))
        self.started = int(time.time())
        self.httpd = ThreadingHTTPServer((host, port), Handler)
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
