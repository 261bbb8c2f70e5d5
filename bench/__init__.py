"""lillm's benchmarks: lillm against Hugging Face transformers, and lillm's own speed and memory.

Run from the repository root: `python -m bench` for the comparison table (bench/__main__.py), or
one module alone (`python -m bench.train`, `bench.decode`, `bench.data`, `bench.mfu`,
`bench.import_hf`, `bench.peft`, `bench.memory`). bench.harness holds what they share. This package sits beside
lillm, not inside it, because it needs transformers, which lillm itself does not.
"""
