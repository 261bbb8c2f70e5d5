"""Benchmark lillm against Hugging Face transformers, side by side, as ratios.

    python -m bench                                   # tiny and lillm-39m on the CPU, everything
    python -m bench --presets tiny --what train decode --steps 10 --threads 2 --json out/b.json
    python -m bench --device cuda                     # adds lillm-300m; bf16, torch.compile, MFU

Run from the repository root. What is compared (same config, weights, batch, dtype, device and
thread count on both sides; bench.harness holds what every comparison shares):
- train:   forward + backward + AdamW step, tokens/s, and the step's peak memory (bench/train.py)
- decode:  greedy generate, 256 new tokens after a 32-token prompt at batch 1 and 8, tokens/s; the
           greedy tokens must be equal before anything is timed (bench/decode.py)
- prefill: the prompt pass of generation for a 512-token prompt, tokens/s (bench/decode.py)
- data:    prepare_pretrain MB/s with 1 and 2 workers, loader batches/s against the training step
           rate (bench/data.py; lillm only, there is no transformers counterpart)
Each runs alone too: python -m bench.train, bench.decode, bench.data (the same flags). Beside
them: bench.mfu (where a GPU step loses MFU), bench.import_hf (importing InkubaLM-0.4B) and
bench.peft (full fine-tuning against LoRA, QLoRA, prefix tuning and adapters), bench.optim (Muon against AdamW:
the training step and the optimizer step alone).

Each comparison warms both sides up, then alternates them over several repetitions and reports the
medians; "lillm advantage" > 1 means lillm is faster (or, for memory, smaller). The machine's load
average is recorded before and after: other processes on a shared machine slow both sides, and a
ratio is only trustworthy when the load stayed low. On a shared machine prefer --threads 1: with
every core's thread in use, an OpenMP thread that loses its core to another process stalls each
small op (tiny's decoding ran 40x slower at 2 threads on 2 busy cores). The run prints markdown tables and writes a
JSON file with the date, device, library versions, thread count and the command line.
"""
from __future__ import annotations

from bench import data, decode, harness, train

WHAT = ("train", "decode", "prefill", "data")
COMPARISONS = {**train.COMPARISONS, **decode.COMPARISONS}  # in WHAT's order; data is not a comparison


def parse_args(argv=None):
    parser = harness.argument_parser(__doc__, what=WHAT)
    for module in (train, decode, data):
        module.add_arguments(parser)
    return harness.parse_args(parser, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "data" not in args.what:
        return harness.run(args, argv, COMPARISONS)
    sources = data.data_sources(args)  # before the models: a missing corpus fails in a second
    return harness.run(args, argv, COMPARISONS, lambda rows: data.bench_data_after(args, sources, rows))


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
