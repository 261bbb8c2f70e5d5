"""Drivers at the edge of the library: shrink, evaluate, import/export, recipes (run as scripts)."""
