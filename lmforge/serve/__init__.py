"""Serving: the OpenAI-compatible HTTP API, metrics and the web chat."""
