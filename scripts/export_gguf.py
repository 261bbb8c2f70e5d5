"""Export a lillm checkpoint to one GGUF file that llama.cpp runs with no conversion step.

    python scripts/export_gguf.py out/pretrain out/model-q8_0.gguf --type q8_0
    python scripts/export_gguf.py out/inkuba out/inkuba-f16.gguf --type f16 --sentencepiece path/to/tokenizer.model
    llama-cli -m out/model-q8_0.gguf -p "Habari za leo" -n 60          # or llama-cpp-python, ollama, ...

Types: f32, f16 (norms stay f32), q8_0 (int8 blocks of 32 with an f16 scale), q4_0 (4-bit blocks;
the embedding stays q8_0). The tokenizer, BOS/EOS/PAD ids and the chat template go into the file.
A mixture of experts is written as llama.cpp's Mixtral layout (stacked expert tensors).
The out file is never inside the checkpoint (or any lillm folder); an existing file is replaced
only when it is a GGUF file and --overwrite is given (lillm/folders.py). See lillm/gguf.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lillm.cli import ArgumentParser, run_main
from lillm.gguf import TYPES, export_gguf


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="lillm checkpoint folder, or a run folder (its latest step)")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--type", dest="kind", choices=TYPES, default="f16", help="weight type (default f16)")
    parser.add_argument("--sentencepiece", type=Path, default=None,
                        help="tokenizer.model of an imported SentencePiece model (default: the checkpoint's own, "
                             "if it has one; else its tokenizer.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file at out")
    args = parser.parse_args(argv)
    out = export_gguf(args.checkpoint, args.out, args.kind, overwrite=args.overwrite,
                      sentencepiece=args.sentencepiece, progress=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB, {args.kind})")


if __name__ == "__main__":
    run_main(main)
