"""What the student's HTTP routes speak: OpenAI's request models, errors and chunks.

No `from __future__ import annotations`: FastAPI resolves these models from the route
signatures at import, and Serve re-wraps the routes.
"""

import json

from pydantic import BaseModel, ConfigDict, Field


class ServeError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )
        self.headers = headers


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|user|assistant|developer)$")
    content: str | list[dict]  # text, or OpenAI content parts [{"type": "text", "text": ...}]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stream: bool = False


def usage(r: dict) -> dict:
    return {
        "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
    }


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
