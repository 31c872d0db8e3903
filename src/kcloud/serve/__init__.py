"""Serving: the scheduler above the engine, the OpenAI-compatible API, metrics, load generator."""
