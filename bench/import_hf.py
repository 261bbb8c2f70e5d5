"""Benchmark importing a full-size InkubaLM-0.4B folder: time and peak memory, fp32 and bf16.

    python -m bench.import_hf                      # ~6 GB of disk in the temp dir
    python -m bench.import_hf --dtypes bfloat16 --no-export

A first subprocess writes a randomly initialised inkuba-0.4b folder the way transformers saves
InkubaLM (fp32 safetensors, the shared MLP stored once under layer 0's names, config.json without
lillm's flag) and exports it with export_llama, to measure what unrolling the shared MLP costs on
disk. Then lillm.hf.import_llama imports the folder in a fresh subprocess per dtype; each reports
wall time and its peak resident memory (ru_maxrss, and VmHWM from /proc; bench.harness.read_memory) against the size of the
model in that dtype (target: under 2.5x; memory right after `import torch` is shown too).
Every measurement runs in a child because Linux hands a child its parent's peak RSS at fork, so
this parent never loads torch.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench import harness  # imports no torch: this parent process must stay small


def child_write(folder: Path, export: bool) -> dict:
    import torch
    from safetensors.torch import save_file

    from lillm.checkpoint import unique_state_dict
    from lillm.config import INKUBA_PARAMS, get_preset
    from lillm.hf import export_llama
    from lillm.model import Transformer

    cfg = get_preset("inkuba-0.4b")
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert model.num_params() == INKUBA_PARAMS
    folder.mkdir(parents=True)
    config = cfg.to_hf_dict()
    config.pop("lillm_shared_mlp")
    config["architectures"] = ["VulavulaLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(unique_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = {"params": model.num_params(), "stored": (folder / "model.safetensors").stat().st_size}
    if export:
        exported = folder.with_name("exported")
        with harness.Stopwatch() as watch:
            export_llama(model, exported)
        result.update(export_s=watch.seconds, unrolled=(exported / "model.safetensors").stat().st_size,
                      unrolled_params=sum(t.numel() for n, t in model.state_dict().items()))
        shutil.rmtree(exported)
    return result


def child_import(folder: Path, dtype: str) -> dict:
    import torch

    from lillm.hf import import_llama

    baseline = harness.read_memory().peak
    with harness.Stopwatch() as watch:
        model = import_llama(folder, dtype=getattr(torch, dtype))
    memory = harness.read_memory()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": watch.seconds, "maxrss": memory.lifetime_peak, "hwm": memory.peak, "baseline": baseline,
            "size": size, "params": model.num_params(), "shared": model.config.shared_mlp}


def run_child(*args: str) -> dict:
    try:
        return harness.run_child("bench.import_hf", *args)
    except RuntimeError as error:
        sys.exit(str(error))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the folders (default: system temp dir)")
    parser.add_argument("--no-export", action="store_true", help="skip measuring the unrolled export")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # a measurement subprocess: print one JSON line
        kind, folder, option = args.child
        out = child_write(Path(folder), option == "export") if kind == "write" else child_import(Path(folder), option)
        print(json.dumps(out))
        return

    gib = 2**30
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "inkuba-random"
        with harness.Stopwatch() as watch:
            written = run_child("--child", "write", str(folder), "no-export" if args.no_export else "export")
        print(f"wrote {folder}: {written['params']:,} parameters, {written['stored'] / gib:.2f} GiB "
              f"(float32, MLP stored once) in {watch.seconds:.0f} s")
        if "unrolled" in written:
            extra = written["unrolled"] - written["stored"]
            print(f"export_llama (MLP unrolled into 8 layers, {written['unrolled_params']:,} parameters) in "
                  f"{written['export_s']:.0f} s: {written['unrolled'] / gib:.2f} GiB, +{extra / gib:.2f} GiB "
                  f"(+{100 * extra / written['stored']:.0f}%) over the folder it came from")
        print("| dtype | import s | peak RSS GiB (ru_maxrss) | VmHWM GiB | model GiB | peak / model | after `import torch` GiB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for dtype in args.dtypes:
            r = run_child("--child", "import", str(folder), dtype)
            assert r["shared"] and r["params"] == written["params"]
            print(f"| {dtype} | {r['seconds']:.1f} | {r['maxrss'] / gib:.2f} | {r['hwm'] / gib:.2f} | "
                  f"{r['size'] / gib:.2f} | {r['maxrss'] / r['size']:.2f}x | {r['baseline'] / gib:.2f} |")


if __name__ == "__main__":
    from lillm.cli import run_main  # one line for bad input, status 2 (lillm/cli.py)

    run_main(main)
