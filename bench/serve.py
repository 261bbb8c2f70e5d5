"""The local server's latency and throughput: time to the first token and tokens/s, 1 and 8 at once.

    python -m bench.serve out/sft/step_000400            # a checkpoint
    python -m bench.serve --preset small --tokenizer out/tokenizer/tokenizer.json --threads 1

A lillm.serve.ChatServer runs in this process on a free port; clients (threads here, plain
http.client) send N streaming /v1/completions requests at once, greedy, each with a different
prompt, and read the server-sent events as they come. Per request: the time from sending to the
first piece of text (first-token latency: queueing, the prompt pass and one decoding step), and
the new tokens over the time from the first piece to the last (decoding speed one user sees).
Overall: all new tokens over the wall time of the round (what the server delivers). The same
prompts decoded by lillm.generate directly, as one batch, give the speed without HTTP.

With --preset the weights are random (drawn at std 0.2, since at the presets' 0.02 a random model
repeats its last token); the work per token depends on the shape only. A random model rarely
emits </s>, and the token counts come from the server's usage report either way. On a shared
machine prefer --threads 1 (see bench/__main__.py). The load average before and after is printed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time

import torch

from lillm import checkpoint as ckpt
from lillm.config import get_preset
from lillm.errors import FlagError
from lillm.generate import generate
from lillm.model import Transformer
from lillm.serve import ChatServer, Defaults
from lillm.tokenizer import Tokenizer

PROMPTS = ["Habari za leo, rafiki yangu", "Ina kwana, yaya aiki", "Sawubona, unjani namhlanje",
           "Molo, unjani", "Watoto wanacheza mpira", "Gwamnatin tarayya ta sanar", "Abantu abaningi",
           "Kesho asubuhi tutasafiri"]


def stream_one(address, prompt: str, max_tokens: int, result: dict) -> None:
    connection = http.client.HTTPConnection(*address, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = last = None
    for line in response.fp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            result["tokens"] = chunk["usage"]["completion_tokens"]
        elif chunk["choices"][0]["text"]:
            last = time.perf_counter()
            first = first or last
    connection.close()
    result.update(sent=sent, first=first, last=last)


def run_round(server: ChatServer, concurrency: int, max_tokens: int) -> dict:
    results = [{} for _ in range(concurrency)]
    threads = [threading.Thread(target=stream_one, args=(server.httpd.server_address[:2],
                                                         PROMPTS[i % len(PROMPTS)], max_tokens, results[i]))
               for i in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {"first_token_ms": statistics.median(1000 * (r["first"] - r["sent"]) for r in results),
            "first_token_ms_max": max(1000 * (r["first"] - r["sent"]) for r in results),
            "per_request_tok_s": statistics.median((r["tokens"] - 1) / (r["last"] - r["first"]) for r in results),
            "total_tok_s": tokens / wall, "tokens": tokens}


def direct_tok_s(model, tokenizer, concurrency: int, max_tokens: int) -> float:
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)], add_bos=True) for i in range(concurrency)]
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=max_tokens, temperature=0, eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id)
    return sum(len(o) for o in out) / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint folder with its tokenizer.json")
    parser.add_argument("--preset", help="random weights of this preset's shape instead of a checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer.json for --preset (its vocabulary sets the model's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per concurrency (the median is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset:
        if not args.tokenizer:
            raise FlagError("--preset needs --tokenizer: a tokenizer.json (train one with train_tokenizer.py)")
        tokenizer = Tokenizer.from_file(args.tokenizer)
        torch.manual_seed(0)
        model = Transformer(get_preset(args.preset, vocab_size=tokenizer.vocab_size, init_std=0.2)).eval()
        name = f"{args.preset} (random weights)"
    elif args.checkpoint:
        folder = ckpt.resolve_checkpoint(args.checkpoint)
        model, tokenizer = ckpt.load_model(folder).eval(), Tokenizer.from_file(folder / "tokenizer.json")
        name = str(folder)
    else:
        raise FlagError("no model: give a checkpoint folder, or --preset NAME and --tokenizer FILE")
    load_before = os.getloadavg()[0]
    print(f"# {name}: {model.num_params() / 1e6:.1f}M parameters, {torch.get_num_threads()} torch threads, "
          f"{args.max_tokens} new tokens per request, greedy", flush=True)
    rows = []
    with ChatServer(model, tokenizer, model_name=name, port=0, log=lambda record: None,
                    defaults=Defaults(max_tokens=args.max_tokens, temperature=0.0),
                    max_batch=max(args.concurrency)) as server:
        run_round(server, 1, 8)  # warm-up
        for concurrency in args.concurrency:
            rounds = [run_round(server, concurrency, args.max_tokens) for _ in range(args.rounds)]
            row = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
            row["concurrency"] = concurrency
            rows.append(row)
            print(json.dumps(row), flush=True)
        batches = dict(server.engine.batch_sizes)
    with torch.no_grad():
        for row in rows:
            row["generate_tok_s"] = statistics.median(direct_tok_s(model, tokenizer, row["concurrency"],
                                                                   args.max_tokens) for _ in range(args.rounds))
    print(f"\nmodel runs by batch size: {batches}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print("| requests at once | first token (median / max) | tokens/s per request | tokens/s in all | "
          "lillm.generate, same batch |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['first_token_ms']:.0f} / {row['first_token_ms_max']:.0f} ms | "
              f"{row['per_request_tok_s']:.0f} | {row['total_tok_s']:.0f} | {row['generate_tok_s']:.0f} |")


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
