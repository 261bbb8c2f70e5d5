"""lillm: small language models for African languages, from scratch in PyTorch."""
