"""The OpenAI protocol: request bodies, their validation, and the error format.

Everything a request can get wrong that does not need the model is refused here, as a one-line 400 naming the
field: pydantic models in strict mode (JSON true is not 1, 1.0 is not an integer, "3" is not a number), with our
own messages for the fields pydantic would explain in its own words. What needs the model (the prompt's length,
token ids in range, a tau list that fits the MoE layers) is checked in `serving_engine.py`.
"""

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..routing import SEED_RANGE

MAX_TAU = 10.0  # the paper never goes above 0.5 and quality collapses above about 1
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy decoding (dividing by ~0 overflows to inf/nan)
MIN_TOP_P = 1e-6  # below it only the most likely token survives (exactly greedy for vocabularies up to 1e6)
MAX_LOGPROBS = 20
MAX_STOPS = 16  # OpenAI allows 4; lm-eval adds the EOS string to a task's own stop list
MAX_STOP_CHARS = 4096  # in all the stop strings (matching costs O(new text) per step; this bounds its tables)


class APIError(Exception):
    """An answer in the OpenAI error format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers
        self.code = code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_not_found(model: str, served: str) -> APIError:
    return APIError(404, f"the model {model!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")


# Fields common clients send that change nothing here, at the values that change nothing: accepted and ignored.
# Any other value is refused by name (as is every field not listed in the request models).
NEUTRAL = {
    "logit_bias": ({}, "{} (no bias)"),
    "response_format": ({"type": "text"}, '{"type": "text"}'),
    "tools": ([], "[] (this server calls no tools)"),
    "suffix": ("", '"" (no suffix)'),
    "modalities": (["text"], '["text"]'),
}


_STRICT = ConfigDict(extra="forbid", strict=True)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class RoESettings(BaseModel):
    """The `roe` object (the `openai` client sends it with `extra_body={"roe": {...}}`)."""

    model_config = _STRICT
    num_samples: int | None = Field(None, ge=1)
    tau: Any = None
    skip_layers: int | None = Field(None, ge=0)
    aggregate: Literal["probs", "logits", "logprobs"] | None = None
    cache: Literal["clean", "full"] | None = None
    adaptive_metric: Literal["entropy", "margin", "off"] | None = None  # adaptive K ("off": every token at K)
    adaptive_threshold: float | None = None  # checked against the metric by RoEConfig (serving_engine.py)

    @field_validator("tau")
    @classmethod
    def _tau(cls, v):
        if v is None:
            return v
        values = v if isinstance(v, list) else [v]
        if not values or not all(_is_number(t) for t in values):
            raise ValueError("tau must be a number or a non-empty list of numbers (one per MoE layer)")
        for t in values:
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"tau must be >= 0 (0 is the model's own routing), got {t}")
            if t > MAX_TAU:
                raise ValueError(f"tau must be <= {MAX_TAU:g}, got {t} (the paper's values are <= 0.5; "
                                 "quality collapses above about 1)")
        return [float(t) for t in v] if isinstance(v, list) else float(v)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class CommonRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    roe: RoESettings | None = None
    # accepted and ignored: they do not change the output
    parallel_tool_calls: bool | None = None  # (no tools)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # accepted at their neutral value only (NEUTRAL)
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Literal["none", "auto"] | None = None

    @field_validator("logit_bias", "response_format", "tools", "suffix", "modalities", check_fields=False)
    @classmethod
    def _neutral(cls, v, info):
        neutral, shown = NEUTRAL[info.field_name]
        if v is not None and v != neutral:
            raise ValueError(f"this server accepts only {shown} or null here, got {json.dumps(v)[:80]}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return v
        if not isinstance(v, (str, list)) or not all(isinstance(s, str) for s in v):
            raise ValueError("stop must be a string or a list of strings")
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(v)}")
        chars = len(v) if isinstance(v, str) else sum(map(len, v))
        if chars > MAX_STOP_CHARS:
            raise ValueError(f"the stop sequences have {chars} characters in all; this server allows at most "
                             f"{MAX_STOP_CHARS}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        lo, hi = SEED_RANGE
        if v is not None and not lo <= v < hi:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {v}")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported")
        return self


class CompletionRequest(CommonRequest):
    prompt: Any
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None  # only = n: the n completions, all returned
    suffix: Any = None

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError(f"unsupported parameter: best_of (this server accepts only best_of = n, which returns "
                             f"every completion; got best_of {self.best_of} with n {self.n or 1})")
        return self

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v) -> list:
        """-> a list of prompts, each a string or a list of token ids."""
        if isinstance(v, str):
            return [v]
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt is an empty list")
            if all(isinstance(p, str) for p in v):
                return v
            if all(_is_int(t) for t in v):
                return [v]
            if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in v):
                return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers) "
                         "or a list of lists of token ids")


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    modalities: Any = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """The first error as one line: 'field.path: what is wrong' (our own messages without pydantic's prefix)."""
    err = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    if err["type"] == "extra_forbidden":
        return f"unsupported parameter: {where} (this server does not know it)", where or None
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        msg = str(err["ctx"]["error"])
    else:
        msg = err.get("msg", "invalid request")
    return (f"{where}: {msg}" if where else msg), where or None


def lone_surrogate(value, path: str = "") -> tuple[str, int, str] | None:
    """Where a JSON string holds half of a UTF-16 surrogate pair ("\\ud800" alone), which is no character:
    (the field's path, the character's index, the escape) for the first one; None when there is none."""
    if isinstance(value, str):
        for i, c in enumerate(value):
            if "\ud800" <= c <= "\udfff":
                return path, i, f"\\u{ord(c):04x}"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None
