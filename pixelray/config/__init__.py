"""Configs: TOML files -> frozen, validated dataclasses (the sweep, its ``[run]`` section, its attacks,
the fine-tune)."""
