"""Serving: the engine (plain torch + PEFT), its OpenAI-compatible API and the Ray Serve shell.

Import the submodules directly; this package imports nothing so that `engine` and `openai_api`
stay usable without Ray.
"""
