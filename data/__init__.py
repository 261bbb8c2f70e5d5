"""Data preparation drivers: token bins for pretraining, conversations for SFT (run as scripts)."""
