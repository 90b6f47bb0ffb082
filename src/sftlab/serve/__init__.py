"""Serving: an OpenAI-compatible HTTP server, a terminal chat, and the generation engines behind them."""
