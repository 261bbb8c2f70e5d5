"""The local server under load, beside llama.cpp's server: concurrent streaming clients for a fixed time.

    python -m bench.serve --clients 1 8 32 --seconds 30        # lillm-39m, random weights: int8 vs q8_0
    python -m bench.serve --checkpoint CKPT --precision fp32   # a trained model: fp32 vs llama.cpp f32
    python -m bench.serve --llama-server PATH ...              # else LILLM_LLAMA_SERVER, else on PATH

Each server runs as a process of its own on 127.0.0.1 (a free port), with the same threads and
slots: lillm as `inference.py CKPT --serve --slots S [--quantize int8]` (and, with --compile, a
second lillm server with its decoding step compiled, `--compile`), llama.cpp as
`llama-server -np S` on the same checkpoint exported to GGUF (lillm/gguf.py; q8_0 beside int8,
f32 beside fp32). Without a llama-server, llama-cpp-python's own server (`python -m
llama_cpp.server`, the [llama] extra with its server dependencies) stands in: it decodes one
request at a time (no slots), so it shows what continuous batching is worth rather than
llama-server's level. Without either, the llama.cpp rows are skipped with the reason printed.

The load: N clients (threads of this process, plain http.client) each wait a random time (so
arrivals spread out instead of landing at once), send a streaming greedy /v1/completions request
of --max-tokens new tokens, read its server-sent events, think for a random time (exponential,
mean --think seconds) and send the next, until --seconds have passed; a request in flight then
finishes. Traffic goes to 127.0.0.1 only, and the run is bounded: --seconds (at most 600), at most
--max-requests per client, a timeout per request.

Per server and client count: requests that completed and that failed (an error, a refused
connection, a short or broken stream); the first-token latency (sending to the first piece of
text: queueing, prefill, one step) as median and p99; tokens/s per request (its tokens after
the first over the time since the first: the speed one user sees); tokens/s in all (every token
over the wall time); and the server process's resident memory after the warm-up, at the end and
at its peak (flat means no leak). Prompts cycle through a few short texts, so llama.cpp's prompt
cache may reuse a slot's prefix; lillm prefills every prompt. Without --checkpoint the model is
the preset's shape with random weights and a small tokenizer's vocabulary (300 tokens; the work
per token depends on the shape only, less the output head's rows).
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lillm.errors import FlagError

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
PROMPTS = ["Habari za leo, rafiki yangu", "Ina kwana, yaya aiki", "Sawubona, unjani namhlanje",
           "Molo, unjani", "Watoto wanacheza mpira", "Gwamnatin tarayya ta sanar", "Abantu abaningi",
           "Kesho asubuhi tutasafiri"]
MAX_SECONDS = 600
REQUEST_TIMEOUT = 120.0


# ---- one request ----------------------------------------------------------------------------------
@dataclass
class Result:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None


def stream_request(port: int, prompt: str, max_tokens: int) -> Result:
    """One streaming greedy completion against 127.0.0.1:port, timed from sending to each piece."""
    result = Result(sent=time.perf_counter())
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return result
        pieces, usage, done = 0, None, False
        for line in response.fp:
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                result.last = time.perf_counter()
                result.first = result.first or result.last
                pieces += 1
        result.tokens = usage if usage is not None else pieces  # a server without usage: one token a piece
        if not done or result.first is None:
            result.error = "the stream ended early" if not done else "no text"
    except (OSError, http.client.HTTPException, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        connection.close()
    return result


# ---- the load -------------------------------------------------------------------------------------
@dataclass
class Load:
    clients: int
    seconds: float
    max_tokens: int = 64
    think: float = 0.5  # mean seconds between a client's answer and its next request
    spread: float = 2.0  # first arrivals fall uniformly in [0, spread) seconds
    max_requests: int = 1000  # per client
    results: list[Result] = field(default_factory=list)


def run_load(port: int, load: Load, memory_of=None) -> dict:
    """The load against 127.0.0.1:port; memory_of() -> bytes is sampled while it runs."""
    lock, start = threading.Lock(), time.perf_counter()
    deadline = start + load.seconds
    samples: list[int] = []
    running = threading.Event()
    running.set()

    def client(index: int) -> None:
        chance = random.Random(index)
        time.sleep(chance.uniform(0, min(load.spread, load.seconds)))
        for number in range(load.max_requests):
            if time.perf_counter() >= deadline:
                return
            result = stream_request(port, PROMPTS[(index + number) % len(PROMPTS)], load.max_tokens)
            with lock:
                load.results.append(result)
            time.sleep(min(chance.expovariate(1 / load.think) if load.think > 0 else 0, 10))

    def watch_memory() -> None:
        while running.is_set():
            samples.append(memory_of())
            time.sleep(0.25)

    watcher = threading.Thread(target=watch_memory, daemon=True) if memory_of else None
    if watcher:
        watcher.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(load.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(load.seconds + load.spread + 10 + REQUEST_TIMEOUT * 2)
    wall = time.perf_counter() - start
    running.clear()
    if watcher:
        watcher.join()
    return summarize(load, wall, samples)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def summarize(load: Load, wall: float, memory: list[int]) -> dict:
    done = [r for r in load.results if r.error is None]
    first = [1000 * (r.first - r.sent) for r in done]
    rate = [(r.tokens - 1) / (r.last - r.first) for r in done if r.tokens > 1 and r.last > r.first]
    return {"clients": load.clients, "seconds": round(wall, 1), "requests": len(done),
            "failed": len(load.results) - len(done),
            "errors": sorted({r.error for r in load.results if r.error})[:3],
            "first_token_ms_median": statistics.median(first) if first else float("nan"),
            "first_token_ms_p99": percentile(first, 0.99),
            "tokens_per_s_per_request": statistics.median(rate) if rate else float("nan"),
            "tokens_per_s_in_all": sum(r.tokens for r in done) / wall,
            "memory_mib_start": memory[0] / 2**20 if memory else None,
            "memory_mib_end": memory[-1] / 2**20 if memory else None,
            "memory_mib_peak": max(memory) / 2**20 if memory else None}


# ---- the servers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    """A server process on 127.0.0.1, its log in a file, stopped (and waited for) on exit."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.port, self.log = name, port, log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}); its log: {self.log}")
            try:
                connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=5)
                connection.request("GET", "/v1/models")  # all three servers have it
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s; its log: {self.log}")

    def memory(self) -> int:
        return resident_bytes(self.process.pid)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def llama_server_path(flag: str | None) -> tuple[str | None, str]:
    """(the llama-server executable or None, why not)."""
    path = flag or os.environ.get("LILLM_LLAMA_SERVER") or shutil.which("llama-server")
    if path and Path(path).is_file() and os.access(path, os.X_OK):
        return path, ""
    return None, ("no llama-server: pass --llama-server PATH or set LILLM_LLAMA_SERVER (llama.cpp's server, "
                  "built from the llama-cpp-python sdist's vendored llama.cpp: see docs/DEPLOY.md)")


def llama_cpp_python_server() -> bool:
    """Whether llama-cpp-python's server (and the packages it needs) can be imported."""
    try:
        return importlib.util.find_spec("llama_cpp.server.app") is not None and all(
            importlib.util.find_spec(name) for name in ("uvicorn", "fastapi", "sse_starlette", "pydantic_settings"))
    except ImportError:
        return False


def build_checkpoint(args, work: Path) -> Path:
    """The checkpoint folder to serve: --checkpoint, or the preset with random weights and a small tokenizer."""
    from lillm import checkpoint as ckpt
    if args.checkpoint:
        return ckpt.resolve_checkpoint(args.checkpoint)
    import torch

    from lillm.config import get_preset
    from lillm.model import Transformer
    from lillm.tokenizer import train_bpe
    text = ["Habari za asubuhi, rafiki yangu.", "Ina kwana? Lafiya lau.", "Sawubona, unjani namhlanje?"] * 20
    tokenizer = train_bpe(text, vocab_size=300, show_progress=False)
    tokenizer.save(work / "tokenizer.json")
    torch.manual_seed(0)
    # The tokenizer's vocabulary, so every token the random model picks is text both servers can send.
    model = Transformer(get_preset(args.preset, vocab_size=tokenizer.vocab_size)).eval()
    return ckpt.save_checkpoint(work / "ckpt", model, tokenizer_path=work / "tokenizer.json")


def lillm_command(args, folder: Path, port: int, compiled: bool = False) -> list[str]:
    command = [sys.executable, str(ROOT / "inference.py"), str(folder), "--serve", "--host", LOOPBACK,
               "--port", str(port), "--slots", str(args.slots), "--max-queue", str(max(64, max(args.clients))),
               "--temperature", "0", "--device", "cpu"]
    return command + (["--quantize", "int8"] if args.precision == "int8" else []) + (["--compile"] if compiled else [])


def llama_command(path: str, gguf: Path, args, context: int, port: int) -> list[str]:
    return [path, "-m", str(gguf), "--host", LOOPBACK, "--port", str(port), "-np", str(args.slots),
            "-c", str(args.slots * context), "-t", str(args.threads), "-tb", str(args.threads), "--no-webui"]


def llama_python_command(gguf: Path, args, context: int, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", LOOPBACK, "--port", str(port),
            "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(context),
            "--interrupt_requests", "False"]  # its default: a new request interrupts the one streaming


def markdown(rows: list[dict]) -> str:
    lines = ["| server | clients | requests ok / failed | first token median / p99 (ms) | tokens/s per request | "
             "tokens/s in all | memory MiB: start / end / peak |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        memory = (f"{row['memory_mib_start']:.0f} / {row['memory_mib_end']:.0f} / {row['memory_mib_peak']:.0f}"
                  if row["memory_mib_start"] is not None else "-")
        lines.append(f"| {row['server']} | {row['clients']} | {row['requests']} / {row['failed']} | "
                     f"{row['first_token_ms_median']:.0f} / {row['first_token_ms_p99']:.0f} | "
                     f"{row['tokens_per_s_per_request']:.1f} | {row['tokens_per_s_in_all']:.1f} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, one round each")
    parser.add_argument("--seconds", type=float, default=30, help=f"length of a round (at most {MAX_SECONDS})")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--think", type=float, default=0.5, help="a client's mean pause between requests, seconds")
    parser.add_argument("--max-requests", type=int, default=1000, help="requests per client at most")
    parser.add_argument("--slots", type=int, default=8, help="parallel slots of both servers")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of both servers")
    parser.add_argument("--precision", choices=["int8", "fp32"], default="int8",
                        help="int8: lillm --quantize int8 beside llama.cpp q8_0; fp32: beside f32")
    parser.add_argument("--preset", default="lillm-39m", help="random weights of this preset (without --checkpoint)")
    parser.add_argument("--checkpoint", help="a checkpoint folder to serve (with its tokenizer.json)")
    parser.add_argument("--compile", action="store_true",
                        help="also lillm with --compile (its decoding step compiled once, before it listens)")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server executable")
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="lillm alone")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS or min(args.clients) < 1 or args.max_tokens < 1 or args.slots < 1:
        raise FlagError(f"--seconds must be in (0, {MAX_SECONDS}], --clients, --max-tokens and --slots at least 1")
    llama_path, why_not = llama_server_path(args.llama_server) if args.llama_cpp else (None, "--no-llama-cpp")
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    folder = build_checkpoint(args, work)
    from lillm.checkpoint import read_config
    context = read_config(folder).max_seq_len
    servers = [("lillm " + args.precision, lambda port: lillm_command(args, folder, port))]
    if args.compile:
        servers.append((f"lillm {args.precision} compiled", lambda port: lillm_command(args, folder, port, True)))
    python_server = args.llama_cpp and not llama_path and llama_cpp_python_server()
    if llama_path or python_server:
        from lillm.gguf import export_gguf
        kind = "q8_0" if args.precision == "int8" else "f32"
        gguf = export_gguf(folder, work / f"model-{kind}.gguf", kind)
        if llama_path:
            servers.append((f"llama.cpp {kind}", lambda port: llama_command(llama_path, gguf, args, context, port)))
        else:
            print(f"# {why_not}; llama-cpp-python's server stands in (one request at a time)", flush=True)
            servers.append((f"llama-cpp-python server {kind}",
                            lambda port: llama_python_command(gguf, args, context, port)))
    else:
        print(f"# llama.cpp skipped: {why_not}", flush=True)
    load_before = os.getloadavg()
    print(f"# {args.checkpoint or args.preset + ' (random weights)'}; {args.threads} threads, {args.slots} slots, "
          f"{args.max_tokens} new tokens per request; load average {load_before[0]:.1f}; {platform.processor()}",
          flush=True)
    rows = []
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}  # torch's threads in the lillm server
    for name, command in servers:
        port = free_port()
        with Server(name, command(port), port, work / f"{name.replace(' ', '_')}.log", env) as server:
            server.wait_ready()
            warm = stream_request(port, PROMPTS[0], args.max_tokens)  # first-call costs out of the rounds
            if warm.error:
                raise RuntimeError(f"{name} failed its warm-up request: {warm.error}; its log: {server.log}")
            for clients in args.clients:
                load = Load(clients, args.seconds, args.max_tokens, args.think, max_requests=args.max_requests)
                rows.append({"server": name, **run_load(port, load, server.memory)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nload average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": args.threads, "slots": args.slots,
                                         "load average before": load_before,
                                         "load average after": os.getloadavg()}, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
