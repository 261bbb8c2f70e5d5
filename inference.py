"""Generate text from a checkpoint folder: prompts, a batch of prompts, or a chat.

    python inference.py out/pretrain/step_000200 --prompt "Habari za leo" --max-new-tokens 60
    python inference.py CKPT --prompt "Watoto" --prompt "Gwamnati" --temperature 0     # a greedy batch
    python inference.py CKPT --chat                                                    # SFT models
    python inference.py CKPT --chat --compile                                          # CUDA-graph decoding
    python inference.py CKPT --prompt "Habari" --quantize int8 --device cpu             # int8 weights (lillm/quant.py)
    echo "Habari" | python inference.py CKPT                                           # prompts from stdin
    python inference.py CKPT --serve --port 8000      # OpenAI-compatible server + chat page (lillm.serve)
    python inference.py CKPT --serve --quantize int8 --compile --device cpu           # its steps compiled first

One prompt streams to the terminal as it is generated; a batch prints each result at the end.
"""
from __future__ import annotations

import argparse
import sys

import torch

from lillm import checkpoint as ckpt
from lillm.cli import ArgumentParser, check_device, number, run_main
from lillm.errors import CheckpointError, FlagError, TokenizerMismatchError
from lillm.generate import StaticDecoder, TextStream, generate
from lillm.peft import load_peft
from lillm.quant import quantize_int8
from lillm.tokenizer import Tokenizer


class StreamPrinter:
    """generate()'s on_token: print a row's text as tokens arrive (lillm.generate.TextStream)."""

    def __init__(self, tokenizer: Tokenizer, out=None):
        self.stream, self.out = TextStream(tokenizer), out or sys.stdout

    def __call__(self, row: int, token: int):
        piece = self.stream.piece(token)
        if piece:
            self.out.write(piece)
            self.out.flush()


def load(folder: str, device: str, adapter: str | None = None):
    folder = ckpt.resolve_checkpoint(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.exists():
        raise CheckpointError(f"{tokenizer_file} is missing: a checkpoint for inference needs its tokenizer "
                              "(copy the tokenizer.json it was trained with into the folder)")
    tokenizer = Tokenizer.from_file(tokenizer_file)
    model = ckpt.load_model(folder, device=device).eval()
    if tokenizer.vocab_size > model.config.vocab_size:  # fewer is fine: a vocabulary padded to a multiple
        raise TokenizerMismatchError(
            f"{tokenizer_file} has {tokenizer.vocab_size} ids but the model in {folder} has vocab_size "
            f"{model.config.vocab_size}: it is not the tokenizer this model was trained with; put that one there")
    if adapter is not None:  # LoRA / QLoRA / prefix / adapter tensors saved apart by lillm.peft.save_peft
        model = load_peft(model, adapter).eval()
    return model, tokenizer


def check_sampling(args) -> None:
    """The device, before the model is loaded (the sampling numbers are checked by their flags' ranges)."""
    check_device(args.device)


def check_length(model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    """A prompt plus its reply must fit the positions the model was trained on."""
    context = model.config.max_seq_len
    longest = max(len(ids) for ids in prompt_ids)
    if longest + max_new_tokens > context:
        room = context - longest
        fix = (f"lower --max-new-tokens to {room}" if room >= 1 else
               f"shorten the prompt to fewer than {context} tokens")
        raise FlagError(f"a prompt of {longest} tokens plus --max-new-tokens {max_new_tokens} is longer than the "
                        f"model's context of {context} tokens; {fix}")


def sampling_options(args, tokenizer: Tokenizer) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                top_p=args.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0, seed=args.seed,
                compile=args.compile)


def complete(model, tokenizer: Tokenizer, prompts: list[str], args) -> list[str]:
    ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    check_length(model, ids, args.max_new_tokens)
    options = sampling_options(args, tokenizer)
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        printer = StreamPrinter(tokenizer)
        new = generate(model, ids, on_token=printer, **options)
        sys.stdout.write("\n")
    else:
        new = generate(model, ids, **options)
        for prompt, tokens in zip(prompts, new):
            print(f"{prompt}{tokenizer.decode(tokens)}\n---")
    return [tokenizer.decode(tokens) for tokens in new]


def chat(model, tokenizer: Tokenizer, args) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message, an empty line to quit")
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        ids, _ = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        try:
            check_length(model, [ids], args.max_new_tokens)
        except FlagError as error:
            print(f"error: {error}; the conversation ends here")
            break
        printer = StreamPrinter(tokenizer)
        new = generate(model, [ids], on_token=printer, **sampling_options(args, tokenizer))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": tokenizer.decode(new[0])})


def serve(model, tokenizer: Tokenizer, args) -> None:
    from lillm.serve import ChatServer, Defaults
    defaults = Defaults(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                        top_p=args.top_p)
    decoder = None
    if args.compile:
        print("compiling the decoding step (a minute or more on a CPU)...", file=sys.stderr, flush=True)
        decoder = StaticDecoder(model)
    server = ChatServer(model, tokenizer, model_name=args.checkpoint.rstrip("/"), host=args.host, port=args.port,
                        defaults=defaults, slots=args.slots, max_queue=args.max_queue, decoder=decoder)
    print(f"serving {args.checkpoint} at {server.url} (chat page: {server.url}/ , API: {server.url}/v1); "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    server.serve_forever()


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint folder (config.json, model.safetensors, tokenizer.json), or a run folder (its latest step)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for a batch (default: read stdin lines)")
    parser.add_argument("--chat", action="store_true", help="chat with an SFT model using the chat template")
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=number(1), default=100)
    parser.add_argument("--temperature", type=number(0, kind=float, rule="must be 0 (greedy) or more"), default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=number(0, rule="must be 0 (off) or more"), default=50)
    parser.add_argument("--top-p", type=number(0, 1, float, above=True, fix="1 turns it off"), default=0.95)
    parser.add_argument("--seed", type=number(0), default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--adapter", default=None, help="a lillm.peft adapter folder to apply to the checkpoint")
    parser.add_argument("--compile", action="store_true",
                        help="decode with fixed shapes through torch.compile (CUDA graphs on a GPU): the first "
                             "reply compiles for a minute, later ones are several times faster (lillm.generate); "
                             "with --serve every decoding step of the server, compiled before it listens")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: projection and head weights as int8 with a scale per output channel, about "
                             "2-3x faster CPU decoding (lillm/quant.py); fp32 stays the reference")
    parser.add_argument("--serve", action="store_true",
                        help="serve the model over HTTP: OpenAI-compatible /v1/chat/completions and /v1/completions, "
                             "and a chat page at / (lillm.serve); the flags above set the default sampling values")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on with --serve (127.0.0.1: this machine only; the server has no "
                             "authentication, so think before 0.0.0.0)")
    parser.add_argument("--port", type=number(0, 65535, rule="must be between 0 (any free port) and 65535"),
                        default=8000, help="port for --serve (0: any free port)")
    parser.add_argument("--slots", "--max-batch", type=number(1), default=8,
                        help="--serve: requests decoded together at most (continuous batching: a new request "
                             "joins at the next decoding step while a slot is free)")
    parser.add_argument("--max-queue", type=number(1), default=64,
                        help="--serve: requests waiting for a slot at most; beyond that the server answers 503 "
                             "with Retry-After")
    args = parser.parse_args(argv)
    if args.serve and (args.chat or args.prompt):
        raise FlagError("--serve runs a server: drop --chat and --prompt")
    if args.slots < 1 or args.max_queue < 0:
        raise FlagError(f"--slots must be at least 1 and --max-queue at least 0 (got {args.slots} and "
                        f"{args.max_queue})")
    check_sampling(args)
    if args.serve:  # a port in use or a host that does not resolve is refused before the model is loaded
        from lillm.serve import listen
        listen(args.host, args.port).server_close()
    model, tokenizer = load(args.checkpoint, args.device, args.adapter)
    if args.quantize == "int8":
        model = quantize_int8(model, inplace=True)
    if args.serve:
        return serve(model, tokenizer, args)
    if args.chat:
        return chat(model, tokenizer, args)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise FlagError("no prompt: pass --prompt TEXT (repeatable), pipe lines on stdin, or use --chat")
    return complete(model, tokenizer, prompts, args)


if __name__ == "__main__":
    run_main(main)
