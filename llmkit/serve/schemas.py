"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

They double as the server's OpenAPI schema, so every bound here (lengths, ranges)
is also what schemathesis explores. Requests are strict: a field this server does not
implement is refused (400 naming it) rather than silently ignored, and values are never
coerced (`n: 1.0`, `ignore_eos: 0`, a `false` token id are errors, not 1, False and 0).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_CHOICES = 8         # `n` per prompt
MAX_PROMPTS = 16        # prompts in one /v1/completions call
MAX_STOP = 4            # stop strings, as OpenAI
MAX_EMBED_INPUTS = 256  # texts in one /v1/embeddings call
MAX_LOGPROBS = 20       # alternatives per token, as OpenAI's top_logprobs


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates (\ud800); they are not text and no tokenizer can encode them
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text contains a lone UTF-16 surrogate, which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenIds = list[int]
Prompt = Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)],
               Annotated[TokenIds, Field(min_length=1)],
               Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
Stop = Union[Text, Annotated[list[Text], Field(max_length=MAX_STOP)], None]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]


class Strict(BaseModel):
    """Request bodies: unknown fields and type coercions are client errors."""
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """The generation parameters shared by completions and chat completions."""
    model: Text
    max_tokens: int | None = Field(None, ge=1, description="default: 16 (completions), rest of the context (chat)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension (as vLLM): generate max_tokens even past end-of-text")
    top_k: int | None = Field(None, ge=0, description="extension: sample from the k most likely tokens (0: all)")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension: drop tokens below min_p x the top probability")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0,  # a tiny one overflows logits / penalty
                                      description="extension: CTRL's penalty, 1 = off")
    num_beams: int = Field(1, ge=1, le=16, description="extension: beam search with this many beams (deterministic, "
                                                      "not streamed); `n` <= num_beams returns the n best")


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")


class FunctionDef(BaseModel):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="the JSON Schema the reply follows")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(..., description="text, texts, token ids, or lists of token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of this many top tokens")
    echo: bool = Field(False, description="put the prompt before the completion (with logprobs: score it)")
    response_format: ResponseFormat | None = Field(None, description="extension (as vLLM): JSON output, as in chat")


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, max_length=64)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name for max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")


class EmbeddingRequest(Strict):
    model: Text
    input: Union[Text, Texts] = Field(..., description="one text or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


# ---- responses (documentation for the OpenAPI schema; handlers build plain dicts) ----

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = Field(None, description="extension: the decoder's context in tokens")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None = None


class ErrorResponse(BaseModel):
    model_config = ConfigDict(title="Error")
    error: ErrorBody
