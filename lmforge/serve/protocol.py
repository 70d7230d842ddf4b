"""Request bodies of the OpenAI-compatible API, as pydantic models.

Field names and defaults follow the OpenAI API so that its official clients work
unchanged. Fields lmforge does not implement are accepted where clients send them by
default and ignored only when ignoring them cannot change the result; otherwise the
request is refused with a clear 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: tolerated (clients add vendor extensions)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64: what a random generator takes
    stream: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # lmforge extensions, named as other OpenAI-compatible servers name them
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False  # keep generating past the end token (benchmarks)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    # Checked by lmforge/serve/tools.py, so that a malformed call is a 400 naming what is wrong.
    tool_calls: Any = None  # assistant: [{"id", "type": "function", "function": {"name", "arguments"}}]
    tool_call_id: Any = None  # tool: the id of the call this message answers
    name: Any = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"] = "text"
    # OpenAI's shape: {"name": ..., "schema": {...}, "strict": true}
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None
    # Function calling (lmforge/serve/tools.py checks them: a bad one is a 400, not a 422).
    tools: Any = None  # [{"type": "function", "function": {"name", "description", "parameters"}}]
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: Any = None  # true (the default): a reply may call several functions
    # lmforge extension: on a server started with --rag, false talks to the bare model;
    # omitted, a server with a knowledge base answers from it.
    rag: StrictBool | None = None


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    stream_options: StreamOptions | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: texts (or token ids of texts) to vectors."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    # One text, several texts, one text as token ids, or several as lists of ids.
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
