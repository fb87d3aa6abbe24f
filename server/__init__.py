"""qserve's OpenAI-compatible HTTP server (installed as qserve.server)."""
