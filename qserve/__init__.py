"""qserve: an LLM quantization serving backend with an OpenAI-compatible API."""

__version__ = "0.1.0"
