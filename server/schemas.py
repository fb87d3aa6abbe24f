"""Request bodies of the OpenAI-compatible API. Strict: unknown fields and out-of-range values
are 400s with a message naming the field, never a 500."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4
MAX_STOP_LEN = 256
MAX_MESSAGES = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _SamplingFields(_Strict):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]
           | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]], Field(max_length=MAX_STOP)]
           | None) = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    user: str | None = Field(default=None, max_length=256)
    # accepted for client compatibility, but only at their neutral values: qserve does not
    # implement penalties or logit bias, and says so in the schema rather than ignoring them
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_SamplingFields):
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
             | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)])
    echo: bool = False


class BudgetRequest(_Strict):
    memory_budget: (Annotated[str, Field(max_length=64, pattern=r"^(?i:\s*(auto|(\d+(\.\d*)?|\.\d+)\s*([kmgt]i?)?b?)\s*)$")]
                     | Annotated[int, Field(ge=1)]) = Field(description="bytes, or a size such as '3GiB', or 'auto'")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
