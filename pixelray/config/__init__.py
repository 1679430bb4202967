"""Configs: TOML files -> frozen, validated dataclasses (the sweep, its attacks, the fine-tune)."""
