"""Offline tools that run from a checkout of puma_jax (`python -m tools.<name>`)."""
