"""facli: long-context offline LLM inference."""

__version__ = "0.1.0"
