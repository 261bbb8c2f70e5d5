"""Export a lillm checkpoint folder to a plain Hugging Face Llama folder (no custom code needed).

    python scripts/export_hf.py out/inkuba out/inkuba-hf --dtype bfloat16

A shared MLP (InkubaLM) is written once per layer, since LlamaForCausalLM has no sharing; the
report says what that costs. Tied embeddings stay tied (lm_head omitted). The tokenizer.json is
copied with a tokenizer_config.json, so transformers.AutoTokenizer loads it. See lillm/hf.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lillm import checkpoint as ckpt
from lillm.cli import ArgumentParser, run_main
from lillm.folders import check_output
from lillm.hf import export_llama
from lillm.tokenizer import Tokenizer

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="lillm checkpoint folder")
    parser.add_argument("out", type=Path, nargs="?", help="folder to write (default out/exported/<checkpoint name>)")
    parser.add_argument("--dtype", choices=DTYPES, default="keep", help="dtype to write (keep: the checkpoint's own)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in `out` (only a folder lillm exported, holding only its files)")
    args = parser.parse_args(argv)
    source = ckpt.resolve_checkpoint(args.checkpoint)  # a checkpoint folder, or a run folder's latest step
    out = args.out or Path("out/exported") / source.name
    check_output(out, "export", overwrite=args.overwrite, flag="out",
                 reads={"the checkpoint": source, "the run folder": args.checkpoint})

    dtype = DTYPES[args.dtype]
    ckpt.read_config(source)  # refuses a corrupt or unsupported config.json by name
    if dtype is None:  # keep the dtype the checkpoint was saved in (load_model builds float32)
        saved = json.loads((source / "config.json").read_text()).get("torch_dtype", "float32")
        dtype = DTYPES.get(saved, torch.float32)
    model = ckpt.load_model(source, dtype=dtype)
    tokenizer = source / "tokenizer.json"
    if tokenizer.exists():
        Tokenizer.from_file(tokenizer)  # the checkpoint's own (its recorded hash), before anything is written
    export_llama(model, out, tokenizer_path=tokenizer if tokenizer.exists() else None, overwrite=args.overwrite)
    cfg = model.config
    element = next(model.parameters()).element_size()
    written = sum(t.numel() for n, t in model.state_dict().items() if not (cfg.tie_embeddings and n == "lm_head.weight"))
    print(f"wrote {out}: {written:,} parameters stored ({(out / 'model.safetensors').stat().st_size / 2**20:,.1f} MiB)")
    if cfg.shared_mlp:
        extra = written - cfg.num_params()
        print(f"  the shared MLP was unrolled into {cfg.n_layers} layers: +{extra:,} parameters, "
              f"+{extra * element / 2**20:,.1f} MiB over the {cfg.num_params():,} the model holds")
    print(f"  tokenizer: {'copied with tokenizer_config.json' if tokenizer.exists() else 'none in the checkpoint'}")


if __name__ == "__main__":
    run_main(main)
