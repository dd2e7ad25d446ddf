"""Request and response bodies of the search API (pydantic models; FastAPI derives the OpenAPI schema from them).

Limits that come from the ``serve`` config (``max_top_k``, ``max_query_chars``) are checked by the app, not here, so
that one schema serves every configuration; fixed shapes (unknown fields refused, 1..64 texts) are checked here.
"""

# no `from __future__ import annotations`: FastAPI must see real (not string) types

from pydantic import BaseModel, ConfigDict, Field


class TextSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(description="What the sound is like, in words.", examples=["a dog barks"])
    top_k: int = Field(10, description="Number of results (1..serve.max_top_k).")
    rerank: bool = Field(True, description="Rerank the clip-level candidates with the full HCI(+AC) score.")


class HitOut(BaseModel):
    rank: int
    id: str
    score: float
    clip_score: float
    kind: str
    text: str | None = None
    source: str | None = None
    captions: list[str] = []
    generated_caption: str | None = None
    duration: float | None = None
    levels: dict[str, float] = {}
    audio_url: str | None = None


class SearchResponse(BaseModel):
    hits: list[HitOut]
    reranked: bool
    timings: dict[str, float] = Field(description="encode_ms, retrieve_ms (stage-1 scan), rerank_ms, hits_ms "
                                                  "(result metadata), total_ms (in the replica), batch_size (text "
                                                  "queries served together; encode and scan are shared)")


class EmbedTextRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, max_length=64)


class EmbedResponse(BaseModel):
    dim: int
    embeddings: list[list[float]]


class HealthOut(BaseModel):
    status: str = Field(description="'ok': this replica has loaded its model and index and answers queries")
    n_clips: int
    auth: bool = Field(description="whether the API needs a bearer token")
    max_top_k: int


class ErrorOut(BaseModel):
    error: str


ERROR_RESPONSES = {code: {"model": ErrorOut} for code in (400, 401, 408, 413, 415, 422, 503)}
