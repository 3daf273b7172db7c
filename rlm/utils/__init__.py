"""Utilities: model clients, prompts and tracing."""
