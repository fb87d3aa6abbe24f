"""Incremental detokenization with stop strings, so streamed text is exactly the final text.

Byte-level BPE tokens can end mid-character; text is released only once it decodes cleanly.
Text that could be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from typing import Any


class StreamDecoder:
    def __init__(self, tokenizer: Any, prompt_tail: list[int], stop: tuple[str, ...]):
        self.tok = tokenizer
        # decoding from a few prompt tokens on keeps leading-space handling right
        self.ids = list(prompt_tail)
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""
        self.sent = 0
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> bool:
        """Append a token; returns True if a stop string now ends the output."""
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self.text += full[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return True
        return False

    def delta(self, final: bool) -> str:
        """New text safe to send now (everything, once the request is finished)."""
        end = len(self.text) if final or not self.stop else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out
