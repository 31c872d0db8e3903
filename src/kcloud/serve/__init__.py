"""Serving: the OpenAI-compatible HTTP service over the engine, and its load generator."""
