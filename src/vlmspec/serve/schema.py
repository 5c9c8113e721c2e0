"""The request body of `POST /v1/chat/completions` as pydantic models (strict types: "5" is not an int), and its
mapping onto the library's HF-chat `messages=` with the image URLs in order."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4
# A seed becomes a torch.Generator seed, which must fit in 64 bits.
MAX_SEED = (1 << 63) - 1


class Strict(BaseModel):
    """Unknown fields are refused by name: a client asking for logprobs or tools must hear it is not served."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ImageURL(Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str          # some clients send the URL itself instead of {"url": …}

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # OpenAI's defaults (temperature 1), so a client that omits a setting gets what it would elsewhere.
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)                     # an extension (vLLM has it too); 0 = off
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                                  # accepted and ignored, as an identifier only

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n must be 1 (this server returns one choice per request), got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        if any(not s for s in strings):
            raise ValueError("a stop string is empty")
        return stop

    @model_validator(mode="after")
    def _one_budget(self) -> "ChatRequest":
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        return self

    @property
    def budget(self) -> int | None:
        """The requested completion budget; None = up to the model's context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def image_urls(self) -> list[str]:
        """Every image part's URL, in message order."""
        return [part.url for message in self.messages if not isinstance(message.content, str)
                for part in message.content if isinstance(part, ImagePart)]

    def hf_messages(self) -> list[dict[str, Any]]:
        """The library's HF-chat messages: image parts become `{"type": "image"}` (the decoded images are passed
        beside them, in the same order); OpenAI's `developer` role is a system message."""
        converted = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            if isinstance(message.content, str):
                converted.append({"role": role, "content": message.content})
                continue
            parts = [{"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
                     for part in message.content]
            converted.append({"role": role, "content": parts})
        return converted
