"""Continuous batching: one thread owns the model and decodes every running request in one batch.

One owner of the model. Generation mutates the model: `setup_cache` hangs a KV cache on every
attention layer and `clear_cache` removes it, so two threads generating at once would write into
each other's caches and mix their answers. Here the HTTP threads only parse, check and tokenize;
a single worker thread (`Engine`) owns the model and takes requests from a bounded queue, and
each request gets its tokens back through a queue of its own.

Continuous batching. Decoding one token for 8 rows costs little more than for 1 on a CPU or GPU
(each step reads every weight once either way), which is why servers batch. Static batching makes
a request that arrives while a batch runs wait for the whole batch; continuous batching (Yu et
al., 2022, "Orca") lets it join at the next decoding step. The engine owns one KV cache of
`slots` rows, each the model's context long. Between two steps it prefills each waiting request
alone into a free row (its prompt at positions 0..n-1) and samples its first token; every step
then feeds each busy row's last token at that row's own position (a per-row cache position, so
rows of different lengths need no padding), and a request that ends frees its row at once.
Greedy and sampled requests share the batch: each slot samples with its own temperature, top-k,
top-p and its own seeded generator, so a seed reproduces an answer whatever else is running.
Requests beyond the slots wait in a bounded queue; beyond that the server answers 503 with
Retry-After. (vLLM, Kwon et al., 2023, adds paged caches, which a small model does not need.)

Compiled steps. With a `StaticDecoder` (lillm.generate; `inference.py --serve --compile`) a step
runs the first 1, 2, 4, ... slots (the power of two that covers the last busy one) over the first
128 cache positions or the whole cache (whichever covers the longest row): at most 8 fixed shapes,
each compiled once before the server listens (inductor's C++ on a CPU, CUDA graphs on a GPU), so no
Python runs per layer. Each shape reads the cache through views made once (the same objects every
step, so the compiled code's guards keep holding). A free row among them decodes a dummy token into
its own row, which its next request's prefill overwrites; attention never reads past a row's own
position. Prefill stays eager (a prompt's length varies).

With int8 weights (lillm/quant.py) fbgemm rounds a call's activations with one scale for all the
call's rows, so a request's logits move slightly with its neighbours in the batch (eager or
compiled): at a near-tie its greedy token can differ from its answer alone. fp32 rows never mix.

Stop strings are matched on the decoded text, across token boundaries: text that could be the
start of a stop string is held back until the next token settles it, so nothing past a stop
string is ever sent (StopMatcher). A client that hangs up (its socket closes) cancels its
request, and the engine frees its slot before the next step.

The HTTP side (lillm/serve.py) checks and tokenizes requests and hands each to `Engine.submit` as
a `Job`; what the job produces comes back on its own queue of events.
"""
from __future__ import annotations

import queue
import random
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import RequestError
from .generate import StaticDecoder, TextStream, sample_next
from .model import Transformer
from .tokenizer import Tokenizer

SHORT_CACHE = 128  # cache positions of the compiled steps for short rows (the rest read the whole context)


@dataclass
class Job:
    """One checked request: its prompt ids and sampling options, and the queue its text comes back on.

    events receives ("text", piece) as text is decoded, then ("end", finish_reason, completion_tokens)
    or ("error", message). cancelled is set by the HTTP thread when the client goes away. The engine
    records the decoding step of the first token and of the end, the tokens made and how it ended.
    """
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_step: int | None = None
    end_step: int | None = None
    generated: int = 0
    finish: str | None = None  # "stop", "length", "cancelled" or "error", once it has ended

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class StopMatcher:
    """Finds the first stop string in decoded text, across token boundaries, and never lets text past it out.

    Text that could be the start of a stop string (a suffix equal to a stop string's prefix) is held
    back until the next piece settles it, so what has been sent never needs taking back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that may be sent now, whether a stop string was reached)."""
        self.held += text
        found = [at for at in (self.held.find(stop) for stop in self.stops) if at >= 0]
        if found:
            before, self.held = self.held[:min(found)], ""
            return before, True
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if self.held.endswith(stop[:n])),
                   default=0)
        ready, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return ready, False

    def flush(self) -> str:
        """The held text, at the end of the answer (no stop string came)."""
        held, self.held = self.held, ""
        return held


class Slot:
    """One request being decoded: its row of the KV cache, its length there, and its own sampler."""

    def __init__(self, job: Job, tokenizer: Tokenizer, device):
        self.job, self.length, self.count, self.last = job, len(job.prompt), 0, 0
        # A generator per request: a seed reproduces its answer whatever else shares the batch.
        seed = job.seed if job.seed is not None else random.randrange(2**63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.text, self.stops = TextStream(tokenizer), StopMatcher(job.stop)

    def sample(self, logits: torch.Tensor) -> int:
        """logits (1, V) -> this request's next token, as lillm.generate samples a batch of one."""
        job = self.job
        return int(sample_next(logits, job.temperature, job.top_k, job.top_p, self.generator))


class Engine:
    """The one thread that runs the model: continuous batching over a fixed number of slots.

    Every slot is a row of one KV cache of the model's context length. Between two decoding steps,
    waiting requests are prefilled (alone, their prompt written into a free row) and join the batch;
    a request that ends (</s>, a stop string, max_tokens, or its client gone) leaves it at once and
    frees its row. A decoding step runs the rows up to the last busy one, each at its own position.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, slots: int = 8, max_queue: int = 64,
                 decoder: StaticDecoder | None = None):
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots must be at least 1 and max_queue at least 0, got {slots} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.device = model.model.embed_tokens.weight.device
        self.slots: list[Slot | None] = [None] * slots
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.steps = 0  # decoding steps run so far (a request's first_step / end_step count in these)
        self.batch_sizes: Counter[int] = Counter()  # how many decoding steps had each number of busy rows
        self.step_shapes: Counter[tuple[int, int]] = Counter()  # steps per (rows, cache positions) run
        self.caches: list | None = None
        self.decoder = decoder  # None: each step runs the busy rows eagerly, over the cache in use
        self.views: dict[tuple, list] = {}  # (first row, end row, positions) -> a compiled step's cache views
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="lillm-engine", daemon=True)

    # -- the caller's side
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)  # blocks while the queue is full: the worker empties it
        self.thread.join()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError("the server has too many requests waiting; retry shortly", status=503,
                               kind="server_error", code="overloaded") from None

    def busy(self) -> int:
        return sum(slot is not None for slot in self.slots)

    # -- the worker's side
    def _run(self) -> None:
        try:
            while self.work_once(block=True):
                pass
        finally:
            for index, slot in enumerate(self.slots):
                if slot is not None:
                    self._end(index, ("error", "the server is shutting down"))
            self.model.clear_cache()

    def work_once(self, block: bool = False) -> bool:
        """Admit waiting requests into free slots, then run one decoding step for the busy ones.
        block: with no busy slot, wait for a request. False once stop() was called: the worker ends."""
        self._admit(block)
        if self.busy():
            self._step()
        return not self.stopping

    def _ensure_cache(self) -> None:
        if self.caches is None:
            self.model.setup_cache(len(self.slots), self.model.config.max_seq_len)
            self.caches = [layer.self_attn.cache for layer in self.model.model.layers]

    @contextmanager
    def _rows(self, rows: slice, length: int, keep: bool = False):
        """The model's cache narrowed to these rows and the first `length` positions, for one call.
        keep: reuse the view objects made the first time for this (rows, length), so a compiled step
        is passed the same modules every call and its guards keep holding."""
        key = (rows.start, rows.stop, length)
        views = self.views.get(key) if keep else None
        if views is None:
            views = [cache.rows(rows, length) for cache in self.caches]
            if keep:
                self.views[key] = views
        layers = self.model.model.layers
        for layer, view in zip(layers, views):
            layer.self_attn.cache = view
        try:
            yield
        finally:
            for layer, cache in zip(layers, self.caches):
                layer.self_attn.cache = cache

    def _admit(self, block: bool) -> None:
        while None in self.slots and not self.stopping:
            try:
                job = self.jobs.get(block=block and not self.busy())
            except queue.Empty:
                return
            if job is None:
                self.stopping = True
            elif job.cancelled.is_set():  # its client left while it waited
                job.finish, job.end_step = "cancelled", self.steps
            else:
                self._prefill(self.slots.index(None), job)

    @torch.no_grad()
    def _prefill(self, index: int, job: Job) -> None:
        """The prompt alone through the model into row `index` of the cache, and the first token."""
        self._ensure_cache()
        self.slots[index] = slot = Slot(job, self.tokenizer, self.device)
        try:
            with self._rows(slice(index, index + 1), len(job.prompt)):
                hidden = self.model(torch.tensor([job.prompt], device=self.device), cache_pos=0, return_hidden=True)
            logits = self.model.lm_head(hidden[:, -1])  # only the last position's logits are needed
        except Exception as error:  # noqa: BLE001 -- a bug or out of memory: fail this request, keep serving
            return self._end(index, ("error", f"generation failed: {type(error).__name__}: {error}"))
        self._emit(index, slot.sample(logits))

    def compiled_shape(self, rows: int, length: int) -> tuple[int, int]:
        """(rows, cache positions) of the compiled step that covers `rows` rows of `length` positions:
        a power of two of rows, at most the slots; 128 positions, or the model's whole context."""
        context = self.model.config.max_seq_len
        positions = min(SHORT_CACHE, context) if length <= SHORT_CACHE else context
        return min(len(self.slots), 1 << (rows - 1).bit_length()), positions

    def compiled_shapes(self) -> list[tuple[int, int]]:
        return sorted({self.compiled_shape(rows, length) for rows in range(1, len(self.slots) + 1)
                       for length in (1, self.model.config.max_seq_len)})

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run the compiled step once per shape on free rows, so no request waits for a compile."""
        if self.decoder is None:
            return
        self._ensure_cache()
        shapes = self.compiled_shapes()
        self.decoder.make_room(len(shapes))
        for rows, length in shapes:
            self._decode([None] * rows, length)

    def _decode(self, rows: list[Slot | None], length: int) -> tuple[torch.Tensor, list[int]]:
        """Logits (rows, V) and greedy tokens for each row's last token at its own position, attending
        over the first `length` cache positions."""
        tokens = torch.tensor([slot.last if slot else 0 for slot in rows], device=self.device)
        positions = torch.tensor([slot.length if slot else 0 for slot in rows], device=self.device)
        with self._rows(slice(0, len(rows)), length, keep=self.decoder is not None):
            if self.decoder is not None:  # one of a few fixed shapes
                logits, greedy, _, _ = self.decoder(tokens, positions[:, None], positions, None)
            else:  # the busy rows (and free ones below them), over the positions in use
                logits = self.model(tokens[:, None], cache_pos=positions)[:, -1]
                greedy = logits.max(-1).indices  # the first maximum, as sample_next's greedy branch
        return logits, greedy.tolist()

    @torch.no_grad()
    def _step(self) -> None:
        """One new token for every busy slot: each row's last token at its own position."""
        for index, slot in enumerate(self.slots):
            if slot is not None and slot.job.cancelled.is_set():
                self._end(index, None)  # the client left: free its row now
        busy = [index for index, slot in enumerate(self.slots) if slot is not None]
        if not busy:
            return
        needed = busy[-1] + 1  # free rows below the last busy one run too (one call), ignored
        length = max(self.slots[index].length for index in busy) + 1
        if self.decoder is not None:
            needed, length = self.compiled_shape(needed, length)
        try:
            logits, greedy = self._decode(self.slots[:needed], length)
        except Exception as error:  # noqa: BLE001 -- fail the requests of this step, keep serving others
            for index in busy:
                self._end(index, ("error", f"generation failed: {type(error).__name__}: {error}"))
            return
        self.steps += 1
        self.batch_sizes[len(busy)] += 1
        self.step_shapes[(needed, length)] += 1
        for index in busy:
            slot = self.slots[index]
            slot.length += 1  # slot.last is in the cache now
            token = greedy[index] if slot.job.greedy else slot.sample(logits[index:index + 1])
            self._emit(index, token)

    def _emit(self, index: int, token: int) -> None:
        """Send a slot's new token as text, and end the request when it is done."""
        slot = self.slots[index]
        job = slot.job
        slot.count, slot.last = slot.count + 1, token
        if job.first_step is None:
            job.first_step = self.steps
        at_eos = self.tokenizer.eos_id is not None and token == self.tokenizer.eos_id
        at_length = slot.count >= job.max_tokens
        piece, stopped = slot.stops.feed(slot.text.piece(token, final=at_eos or at_length))
        if (at_eos or at_length) and not stopped:
            piece += slot.stops.flush()
        if piece:
            job.events.put(("text", piece))
        if at_eos or stopped or at_length:
            self._end(index, ("end", "stop" if at_eos or stopped else "length", slot.count))

    def _end(self, index: int, event: tuple | None) -> None:
        """Free a slot; event is what its request is told (None: nobody is listening any more)."""
        job, count = self.slots[index].job, self.slots[index].count
        self.slots[index] = None
        job.generated, job.end_step = count, self.steps
        job.finish = event[1] if event and event[0] == "end" else ("cancelled" if event is None else "error")
        if event is not None:
            job.events.put(event)
