"""Engine configuration (pydantic): validated once, at the edge."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from lessserve.workers.compression import Policy
from lessserve.workers.errors import ConfigError
from lessserve.workers.model_loader import DEFAULT_MODEL

KvBits = Literal["native", "8", "4"]  # slot formats: the model dtype, or 8 / 4-bit codes
KV_BITS: tuple[str, ...] = get_args(KvBits)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="Alias, local HF folder, cached hub id or .gguf file")
    policy: str = Field("h2o", description="full | h2o | lambda, optionally +less (or + for equal memory)")
    budget: int = Field(128, ge=2, le=65536, description="Cached tokens per layer and KV head")
    recent: int | None = Field(None, ge=1, description="h2o recent window (default budget/2)")
    sink: int = Field(4, ge=1, description="lambda: first tokens always kept")
    less_weights: str | None = Field(None, validation_alias=AliasChoices("less_weights", "less_kernels"),
                                     description="Learned LESS weights .safetensors (default: the shipped ones; "
                                     "`less_kernels` is the old name, accepted for one release)")
    max_slots: int = Field(8, ge=1, le=4096, description="Session slots preallocated on the device")
    max_context: int = Field(8192, ge=16, description="Longest session for the `full` policy")
    max_model_len: int | None = Field(None, ge=16, description="Longest session in tokens (prompt + history + "
                                      "generated), at most the model's context (default: the model's context: "
                                      "max_position_embeddings as RoPE-scaled, capped at a sliding window)")
    chat_template: str | None = Field(None, description="Jinja chat template replacing the tokenizer's: a file path "
                                      "or the template itself")
    prefill_chunk: int = Field(256, ge=1, le=8192, description="Tokens per chunked-prefill step (the evaluations "
                               "run at 32; 256 measured against it in docs/bench_chunking.md)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and activations (auto: the checkpoint's stored half dtype on CUDA, bfloat16 for "
        "a float32 checkpoint there; float32 on the CPU)")
    kernels: Literal["auto", "torch", "triton"] = Field("auto", description="Compute-kernel implementation "
                                                        "(auto: Triton on CUDA, torch elsewhere)")
    kv_bits: KvBits = Field(
        "native", description="Bits per cached key / value element: native (the model dtype), 8 or 4 (codes with "
        "an fp16 scale and zero per entry and group of 32 channels, keys less a per-channel center each slot takes "
        "from its first chunk: kernels/reference/kv_quant.py; a slot holds 1.7-5.8x the tokens in the same bytes; "
        "not with +recall)")
    cuda_graphs: bool = Field(False, description="Decode steps through CUDA graphs captured per batch-size bucket "
                              "(CUDA only; one extra pad slot; a bucket that cannot be captured runs eagerly)")
    compile: bool = Field(False, description="Decode steps' per-layer compressed step through torch.compile, one "
                          "compile per batch-size bucket at start-up (torch kernels, compressed policies; one "
                          "extra pad slot; pays with a LESS state on CPU, docs/bench_decode.md)")

    recall_pages: int = Field(8, ge=1, le=4096, description="+recall: history pages brought back at each turn, the "
                              "same for every layer and KV head (pages x page tokens of the budget are set aside "
                              "for them)")
    recall_page: int = Field(8, ge=1, le=4096, description="+recall: tokens per history page")
    recall_queries: int = Field(4, ge=1, le=8192, description="+recall: the last tokens of a turn's prompt whose "
                                "queries choose the history pages (a rolling window across the session's steps, the "
                                "prompt's last token included)")
    recall_heads: int = Field(8, ge=0, le=65536, description="+recall: a history page's score sums the attention "
                              "mass of the layer-heads (every layer's KV heads) that put the most on it, this many "
                              "(0: all of them)")
    recall_lead: int = Field(8, ge=0, le=8192, description="+recall: a history page's score also counts the "
                             "attention mass on this many tokens before it: what follows a cue the question "
                             "matches (\"The access code is\" -> the code), which a page boundary can put on "
                             "the next page (0: the page's own tokens only)")
    recall_reread: int = Field(16, ge=1, le=8192, description="+recall: the last tokens of a turn's prompt read again "
                               "over the slot once the pages are back (at most the last chunk and the recent window), "
                               "so their K/V and the reply's first logits see the recalled pages")
    recall_layer: int = Field(0, ge=0, le=1024, description="+recall: 0: the round runs after the prompt's last "
                              "step, every layer's queries choose the pages and the re-read runs every layer. L > 0: "
                              "the queries of the layers below L choose, the re-read runs layers L and up (those "
                              "below keep the step's), and a turn whose last piece the re-read covers whole runs "
                              "in one pass, the round inside the step before layer L")
    history_bytes: int = Field(4 << 30, ge=0, description="+recall: host bytes the histories of the sessions on "
                               "the device may take; past it the oldest pages of the least recently used sessions "
                               "are dropped (they degrade to plain eviction)")

    @field_validator("kv_bits", mode="before")
    @classmethod
    def _kv_bits(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # 8 and "8" alike

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        try:
            return Policy.parse(v).name
        except ConfigError as e:
            raise ValueError(str(e)) from None
