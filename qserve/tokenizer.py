"""Tokenizer loading and prompt encoding (chat templates come from the checkpoint)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qserve.errors import CheckpointError, ConfigError


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a tokenizer


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(model_dir: Path) -> Any:
    model_dir = Path(model_dir)
    if not has_tokenizer(model_dir):
        raise CheckpointError(f"{model_dir} has no tokenizer (tokenizer.json); qserve needs one to serve")
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise CheckpointError(f"cannot load the tokenizer in {model_dir}: {e}") from e


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this model has no chat template; use /v1/completions")
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # jinja errors for messages the template rejects
        raise ConfigError(f"the chat template rejected these messages: {e}") from e
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
