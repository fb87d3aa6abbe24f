"""qserve: an LLM quantization serving backend with an OpenAI-compatible API."""

import os

# oneDNN builds and caches a kernel per matmul shape (~1 MB of RSS each, 1024 by default); a
# server sees many prompt lengths, so bound the cache before torch loads it. Decode shapes, which
# repeat every step, stay far below this.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

__version__ = "0.1.0"
