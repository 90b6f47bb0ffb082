"""sftlab: supervised fine-tuning of LLMs end to end."""

__version__ = "0.1.0"
