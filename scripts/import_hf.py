"""Import a Hugging Face Llama folder (InkubaLM-0.4B or any Llama) into a lillm checkpoint folder.

    python scripts/import_hf.py path/to/InkubaLM-0.4B out/inkuba --dtype bfloat16

Reads config.json (refusing what lillm does not implement), the weights (safetensors, sharded or
not, or .bin through torch.load(weights_only=True)) one tensor at a time, and the tokenizer
(tokenizer.json, rebuilt from tokenizer.model when it does not load), then prints a report and
writes a checkpoint folder (config.json, model.safetensors, tokenizer.json). See lillm/hf.py.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from lillm import checkpoint as ckpt
from lillm.checkpoint import need_folder
from lillm.cli import ArgumentParser, run_main
from lillm.folders import check_output
from lillm.hf import import_llama
from lillm.spm import load_tokenizer, save_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="Hugging Face model folder (config.json, weights, tokenizer)")
    parser.add_argument("out", type=Path, nargs="?", help="checkpoint folder to write (default out/imported/<src name>)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the imported weights")
    parser.add_argument("--unroll-mlp", action="store_true", help="load a shared MLP as one copy per layer")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier import in `out` (only a lillm checkpoint holding only its files)")
    args = parser.parse_args(argv)
    need_folder(args.src, "Hugging Face model folder")
    out = args.out or Path("out/imported") / args.src.name
    check_output(out, "checkpoint", overwrite=args.overwrite, flag="out", reads={"the source folder": args.src})

    start, notes = time.perf_counter(), []
    model = import_llama(args.src, dtype=DTYPES[args.dtype], shared_mlp=False if args.unroll_mlp else None,
                         notes=notes, progress=True)
    seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(args.src)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux

    cfg = model.config
    print(f"imported {args.src} in {seconds:.1f} s, peak RSS {peak_gib:.2f} GiB, dtype {args.dtype}")
    for line in notes:
        print(f"  {line}")
    print(f"  shared MLP: {'yes' if cfg.shared_mlp else 'no'}; layers {cfg.n_layers}, d_model {cfg.d_model}, "
          f"heads {cfg.n_heads}/{cfg.n_kv_heads} kv, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, tied {cfg.tie_embeddings}")
    for part, count in cfg.param_counts().items():
        print(f"  {part:>13}: {count:>13,}")
    assert model.num_params() == cfg.num_params()
    print(f"  tokenizer: {'none found' if tokenizer is None else f'{tokenizer.get_vocab_size()} tokens'}")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = save_tokenizer(tokenizer, Path(tmp) / "tokenizer.json") if tokenizer else None
        ckpt.save_checkpoint(out, model, tokenizer_path=tokenizer_path, overwrite=args.overwrite,
                             info={"stage": "import", "source": str(args.src), "notes": notes})
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
