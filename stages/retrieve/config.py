"""Typed config of the retrieve stage (the ``stages.retrieve`` section of a run config).

Every key is documented in docs/retrieve.md. The image source is a tagged union on ``kind`` so a config names exactly
one source and only that source's keys are accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator

from gmner_pipeline.configbase import Strict
from gmner_pipeline.prompts import prompt_hash
from gmner_pipeline.stage import StageConfig


class ClipConfig(Strict):
    """Which CLIP model scores candidates. Weights must be real: there is no random-weight fallback."""

    model: str = Field(
        "ViT-B-32",
        description="open_clip architecture name (e.g. ViT-B-32, ViT-L-14), or 'hf-hub:org/repo', "
        "or 'local-dir:/path' (a folder with open_clip_config.json and the weights)",
    )
    pretrained: str | None = Field(
        "openai",
        description="open_clip pretrained tag (e.g. openai, laion2b_s34b_b79k) or a local checkpoint file "
        "(.pt/.bin/.safetensors); ignored for hf-hub:/local-dir: models, which carry their weights",
    )
    model_config_file: str | None = Field(
        None, description="an open_clip model config JSON to register before loading (custom architectures)"
    )
    cache_dir: str | None = Field(None, description="where open_clip caches downloaded weights (default: its own)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto = fp16 on GPU, fp32 on CPU"
    )
    batch_size: int = Field(32, ge=1, description="images (and texts) per forward pass")
    loader_threads: int = Field(2, ge=1, description="threads decoding/preprocessing images ahead of the model")

    @field_validator("pretrained")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty; give a pretrained tag (e.g. openai) or a checkpoint path")
        return value


class DownloadConfig(Strict):
    """Limits of the safe image downloader (web search results and URL lists)."""

    max_bytes: int = Field(10_000_000, ge=1024, description="largest accepted response body")
    max_pixels: int = Field(40_000_000, ge=1, description="largest accepted width*height (decompression-bomb guard)")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next chunk of bytes")
    total_timeout_s: float = Field(30.0, gt=0, description="longest time for one download, all chunks together")
    max_redirects: int = Field(3, ge=0)
    retries: int = Field(3, ge=1, description="attempts per URL on transient failures (connection, 429, 5xx)")
    backoff_s: float = Field(0.5, ge=0, description="first retry wait; doubles each attempt (with jitter)")
    per_host_interval_s: float = Field(0.2, ge=0, description="minimum time between two requests to one host")
    workers: int = Field(8, ge=1, description="parallel downloads")
    allow_private_hosts: bool = Field(
        False, description="allow URLs resolving to loopback/private addresses (off: guards against SSRF)"
    )
    user_agent: str = "gmner-pipeline/0.1 (+https://github.com/gmner-pipeline)"
    store_dir: str | None = Field(
        None, description="content-addressed image store (default: <output_dir>/images, or ~/.cache when unset or a bucket; "
        "a local or shared folder: later stages open the images by path)"
    )


class LocalCorpusSource(Strict):
    kind: Literal["local_corpus"] = "local_corpus"
    path: str = Field(..., description="a folder of images, a Parquet file/folder, a WebDataset .tar/folder, or a .txt "
                      "list of image paths/URLs (one per line)")
    format: Literal["auto", "folder", "parquet", "webdataset", "list"] = "auto"
    image_column: str = Field("image", description="Parquet: column with image bytes (or a {bytes, path} struct)")
    uri_column: str | None = Field(None, description="Parquet: column naming each image (URL/key), else file:row")
    index_dir: str | None = Field(
        None, description="where embeddings are stored (default: '<path>.clip-index' beside the corpus, or a "
        "user cache folder when that is not writable)"
    )
    faiss_min_items: int = Field(50_000, ge=1, description="use FAISS (exact inner product) from this corpus size "
                                 "when faiss is installed; numpy otherwise")


class WebSearchSource(Strict):
    """A JSON image-search HTTP API: GET endpoint?q=...&count=N, results at ``results_path``, URL at ``url_field``."""

    kind: Literal["web_api"] = "web_api"
    endpoint: str = Field(..., description="search URL, e.g. https://api.search.brave.com/res/v1/images/search")
    api_key_env: str | None = Field("GMNER_IMAGE_SEARCH_KEY", description="env var holding the API key (null: none)")
    key_in: Literal["header", "query"] = "header"
    key_name: str = Field("Authorization", description="header or query parameter carrying the key")
    key_prefix: str = Field("Bearer ", description="text before the key in the header value")
    query_param: str = "q"
    count_param: str | None = "count"
    params: dict[str, str] = Field(default_factory=dict, description="extra fixed query parameters")
    results_path: str = Field("results", description="dotted path to the result list in the JSON response")
    url_field: str = Field("url", description="dotted path to the image URL inside one result")
    timeout_s: float = Field(15.0, gt=0)
    retries: int = Field(3, ge=1)
    backoff_s: float = Field(1.0, ge=0)
    concurrency: int = Field(4, ge=1, description="search requests in flight per worker (mind the provider's QPS)")


ImageSourceConfig = Annotated[Union[LocalCorpusSource, WebSearchSource], Field(discriminator="kind")]


class RetrieveConfig(StageConfig):
    """Stage 1 (VKEL): pair a text-only sentence with a retrieved image, kept when CLIP similarity >= alpha."""

    source: ImageSourceConfig | None = Field(None, description="where candidate images come from (required)")
    clip: ClipConfig = Field(default_factory=ClipConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    top_k: int = Field(5, ge=1, description="candidates per sentence (VKEL: 5)")
    alpha: float = Field(0.3, ge=-1, le=1, description="keep the top-1 candidate only if its cosine >= alpha (VKEL: "
                         "0.3, calibrated for OpenAI/OpenCLIP ViT models)")
    max_tokens: int | None = Field(26, ge=1, description="drop longer sentences (reason too_long); null: no limit")
    query_template: str = Field("retrieve/query.txt", description="prompt file with {text} and {entities}")
    entity_separator: str = ", "
    score_text: Literal["sentence", "query"] = Field(
        "sentence", description="what CLIP's text side embeds for scoring: the sentence (VKEL eq. 2) or the query"
    )

    def key_payload(self) -> dict[str, Any]:
        """The stage key also covers the query template's text: editing it changes every query."""
        try:
            template = prompt_hash(self.query_template)
        except (FileNotFoundError, OSError):
            template = None  # preflight reports the missing template with what to do
        return {**super().key_payload(), "query_template_hash": template}
