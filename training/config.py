"""Configuration of LESS-weights training (pydantic): the per-layer stage, the end-to-end stage,
and a whole `lessserve train-less` run. The CLI reads its defaults from these models."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lessserve.lab.corpus import SPLIT_RULE, corpus_paths
from lessserve.workers.model_loader import DEFAULT_MODEL


class TrainConfig(BaseModel):
    """The per-layer stage: fit each layer's phi/psi to that layer's full attention output."""

    model_config = ConfigDict(extra="forbid")

    model: str
    policy: Literal["h2o", "lambda"] = Field(description="eviction policy the weights serve")
    budget: int = Field(128, ge=2, le=65536, description="cached tokens per layer and KV head")
    rank: int = Field(8, ge=1, le=256, description="rank R of the low-rank state")
    hidden: int = Field(64, ge=1, le=4096, description="hidden width R' of phi/psi")
    epochs: int = Field(5, ge=1, le=1000)
    seed: int = 0
    chunk: int = Field(32, ge=1, le=8192, description="engine prefill chunk the masks replay")
    recent: int | None = Field(None, ge=1, description="h2o recent window (default budget/2)")
    sink: int = Field(4, ge=1, description="lambda sink tokens")
    lr: float = Field(1e-2, gt=0, lt=1)
    batch: int = Field(2, ge=1, le=1024, description="sequences per optimiser step")
    query_chunks: int = Field(8, ge=0, description="query chunks per sequence (seeded per layer) used as "
                              "training positions; 0 = all")
    qkv_source: Literal["full", "compressed"] = Field(
        "full", description="Q/K/V from the full-cache forward (paper) or from the base policy's serving run")
    dropout: float = Field(0.3, ge=0, lt=1)
    data_sha256: str = ""
    command: str = ""
    extra: dict = Field(default_factory=dict)

    def run_name(self) -> str:
        src = "" if self.qkv_source == "full" else f"-{self.qkv_source}"
        return f"{self.policy}-b{self.budget}-r{self.rank}-h{self.hidden}-e{self.epochs}-s{self.seed}{src}"


class StreamConfig(BaseModel):
    """The streaming per-layer stage (training/stream.py): one forward per window of the train
    stream feeds one optimiser step of every layer of every policy; validated on dev windows."""

    model_config = ConfigDict(extra="forbid")

    model: str
    policies: list[Literal["h2o", "lambda"]] = Field(min_length=1, description="policies trained from one stream")
    budget: int = TrainConfig.model_fields["budget"]
    rank: int = TrainConfig.model_fields["rank"]
    hidden: int = TrainConfig.model_fields["hidden"]
    chunk: int = TrainConfig.model_fields["chunk"]
    recent: int | None = TrainConfig.model_fields["recent"]
    sink: int = TrainConfig.model_fields["sink"]
    seed: int = 0
    seq_len: int = Field(2048, ge=16, le=65536, description="tokens per window")
    tokens: int = Field(ge=16, le=10**11, description="planned tokens (windows = tokens // seq_len); the "
                        "learning-rate schedule spans them")
    lr: float = TrainConfig.model_fields["lr"]
    warmup: int = Field(10, ge=0, description="windows of linear learning-rate warm-up")
    lr_floor: float = Field(0.1, ge=0, le=1, description="the cosine decay ends at this fraction of lr")
    query_chunks: int = TrainConfig.model_fields["query_chunks"]
    dropout: float = TrainConfig.model_fields["dropout"]
    eval_every: int = Field(25, ge=1, le=10**7, description="windows between dev evaluations")
    checkpoint_every: int = Field(25, ge=1, le=10**7, description="windows between checkpoints")
    export_every: int = Field(0, ge=0, le=10**7, description="windows between exports of the best-by-dev weights "
                              "(0 = none)")
    dev_seqs: int = Field(2, ge=1, le=1000, description="evenly spaced dev windows per file")
    dev_query_chunks: int = Field(16, ge=0, description="query chunks per layer (seeded) of the dev loss; 0 = all")
    data_sha256: str = ""
    dev_sha256: str = ""

    SAVING: ClassVar[frozenset] = frozenset({"checkpoint_every", "export_every"})  # where/when, not what is learned

    @property
    def windows(self) -> int:
        return self.tokens // self.seq_len

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.policies)) != len(self.policies):
            raise ValueError("policies: each policy once")
        if self.seq_len <= self.budget + self.chunk:
            raise ValueError(f"seq_len: must exceed budget + chunk ({self.budget + self.chunk}) for evictions")
        if self.seq_len % self.chunk:
            raise ValueError(f"seq_len: must be a multiple of chunk ({self.chunk})")
        if self.tokens < self.seq_len:
            raise ValueError(f"tokens: must be at least seq_len ({self.seq_len})")
        if self.warmup >= self.windows:
            raise ValueError(f"warmup: must be below the planned windows ({self.windows})")
        return self

    def lr_at(self, window: int) -> float:
        """Learning rate of the step on window `window` (0-based): linear warm-up, then cosine to lr * lr_floor."""
        if window < self.warmup:
            return self.lr * (window + 1) / self.warmup
        frac = min(window - self.warmup, self.windows - self.warmup) / max(self.windows - self.warmup, 1)
        return self.lr * (self.lr_floor + (1 - self.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac)))


STREAM_FLAGS = {"tokens": "--stream-tokens", "warmup": "--stream-warmup", "lr_floor": "--stream-lr-floor",
                "eval_every": "--stream-eval-every", "checkpoint_every": "--stream-checkpoint-every",
                "export_every": "--stream-export-every", "dev_query_chunks": "--stream-dev-chunks",
                "policies": "--policies", "data_sha256": "--data", "dev_sha256": "--data"}


def stream_flag(field: str) -> str:
    """The `train-less` flag that sets a StreamConfig field."""
    return STREAM_FLAGS.get(field, "--" + field.replace("_", "-"))


class FinetuneConfig(BaseModel):
    """The end-to-end stage: all layers at once, KL(full || compressed+LESS) of next-token distributions."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(60, ge=1, le=10**6, description="sequences trained on (one per step)")
    lr: float = Field(1e-3, gt=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after "
                                                               "the warm-up")
    warmup: int = Field(0, ge=0, le=10**6, description="steps of linear learning-rate warm-up")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the first layer of phi/psi (training only)")
    clip: float = Field(1.0, gt=0)
    eval_every: int = Field(10, ge=1, le=10**6, description="steps between validation passes")
    patience: int = Field(0, ge=0, le=10**6, description="stop after this many validation passes without a "
                          "better dev score (0 = never)")
    bf16: bool = Field(False, description="run the frozen model's matmuls under bf16 autocast while training "
                       "(masks, attention and LESS stay fp32; validation is fp32)")
    seed: int = 0

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup >= self.steps:
            raise ValueError(f"warmup: must be below steps ({self.steps})")
        return self


class TrainLessConfig(BaseModel):
    """One `lessserve train-less` run: data, the per-layer stage (unless `init` is given), then
    `finetune_steps` of the end-to-end stage. With `stream_tokens`, the per-layer stage streams
    (StreamConfig; one or several `policies`) and is the whole run."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="alias, HF folder, cached hub id or .gguf")
    policy: Literal["h2o", "lambda"] = Field("h2o", description="eviction policy the weights serve")
    budget: int = TrainConfig.model_fields["budget"]
    data: list[str] = Field(default_factory=lambda: [str(p) for p in corpus_paths().values()], min_length=1,
                            description="UTF-8 text files or directories; only each file's train part is trained "
                            "on and its dev part validates (lab/corpus.py: " + SPLIT_RULE + ")")
    rank: int = TrainConfig.model_fields["rank"]
    hidden: int = TrainConfig.model_fields["hidden"]
    epochs: int = TrainConfig.model_fields["epochs"]
    seq_len: int = Field(1024, ge=16, le=65536, description="tokens per training sequence (2048 with --stream-tokens "
                         "unless given)")
    num_seqs: int = Field(24, ge=2, le=100000, description="sequences of the per-layer stage (an equal share "
                          "from every file)")
    batch: int = TrainConfig.model_fields["batch"]
    lr: float = TrainConfig.model_fields["lr"]
    query_chunks: int = TrainConfig.model_fields["query_chunks"]
    chunk: int = TrainConfig.model_fields["chunk"]
    recent: int | None = TrainConfig.model_fields["recent"]
    sink: int = TrainConfig.model_fields["sink"]
    qkv_source: Literal["full", "compressed"] = TrainConfig.model_fields["qkv_source"]
    seed: int = 0
    out: str | None = Field(None, description="weights .safetensors (default: the shipped location)")
    stage1_out: str | None = Field(None, description="where the per-layer stage's weights are saved too (default: "
                                   "<work-dir>/<run>/stage1.safetensors)")
    work_dir: str | None = Field(None, description="captures and finished layers, or the streaming run directory "
                              "(default: the cache dir)")
    resume: bool = Field(False, description="keep finished layers of an interrupted run (streaming: continue from "
                         "its checkpoint)")
    threads: int = Field(1, ge=1, le=1024, description="CPU threads")
    device: str = "auto"
    init: str | None = Field(None, description="start from these weights (.safetensors) instead of training "
                             "layer by layer")
    finetune_steps: int = Field(0, ge=0, le=10**6, description="then fine-tune all layers end to end (KL to the "
                                "full model) for this many sequences")
    finetune_lr: float = FinetuneConfig.model_fields["lr"]
    finetune_seqs: int = Field(64, ge=2, le=100000, description="training sequences of --seq-len for the end-to-end "
                               "stage (an equal share from every file)")
    finetune_eval_every: int = FinetuneConfig.model_fields["eval_every"]
    finetune_schedule: Literal["cosine", "linear", "constant"] = FinetuneConfig.model_fields["schedule"]
    finetune_warmup: int = FinetuneConfig.model_fields["warmup"]
    finetune_dropout: float = FinetuneConfig.model_fields["dropout"]
    finetune_patience: int = FinetuneConfig.model_fields["patience"]
    finetune_bf16: bool = FinetuneConfig.model_fields["bf16"]
    dev_seqs: int = Field(2, ge=1, le=1000, description="evenly spaced dev sequences of --seq-len per file that "
                          "validate the end-to-end stage (and pick its step) or the streaming stage")
    stream_tokens: int = Field(0, ge=0, le=10**11, description="tokens of the streaming per-layer stage: one forward "
                               "per --seq-len window (default 2048 here) of the train stream feeds one step of every "
                               "layer and policy, nothing written but checkpoints (0 = the capture-based stage)")
    policies: list[Literal["h2o", "lambda"]] | None = Field(
        None, description="comma-separated policies the streaming stage trains from one stream, sharing its "
        "forward (e.g. h2o,lambda; default: --policy); with several, --out FILE.safetensors gives FILE-<policy>."
        "safetensors")
    stream_warmup: int = StreamConfig.model_fields["warmup"]
    stream_lr_floor: float = StreamConfig.model_fields["lr_floor"]
    stream_eval_every: int = StreamConfig.model_fields["eval_every"]
    stream_checkpoint_every: int = StreamConfig.model_fields["checkpoint_every"]
    stream_export_every: int = StreamConfig.model_fields["export_every"]
    stream_dev_chunks: int = StreamConfig.model_fields["dev_query_chunks"]

    @field_validator("policies", mode="before")
    @classmethod
    def _split_policies(cls, v):
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        if v is not None:
            bad = [p for p in v if p not in ("h2o", "lambda")]
            if bad or not v:
                raise ValueError(f"expected a comma-separated subset of h2o,lambda, got {','.join(bad) or 'none'}")
            if len(set(v)) != len(v):
                raise ValueError("each policy once")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream_tokens:
            self._stream_consistent()
        elif self.policies is not None:
            raise ValueError("policies: only with stream_tokens > 0 (the capture-based stage trains one policy)")
        if self.seq_len <= self.budget + self.chunk:
            raise ValueError(f"seq_len: must exceed budget + chunk ({self.budget + self.chunk}) for evictions")
        if self.seq_len % self.chunk:
            raise ValueError(f"seq_len: must be a multiple of chunk ({self.chunk})")
        if self.init is not None and not self.finetune_steps:
            raise ValueError("init: only makes sense with finetune_steps > 0")
        if self.finetune_steps and self.finetune_warmup >= self.finetune_steps:
            raise ValueError(f"finetune_warmup: must be below finetune_steps ({self.finetune_steps})")
        return self

    def _stream_consistent(self) -> None:
        if "seq_len" not in self.model_fields_set:
            self.seq_len = StreamConfig.model_fields["seq_len"].default
        for field, why in (("init", "fine-tune the stream's output with a second run"),
                           ("stage1_out", "the stream's weights are out")):
            if getattr(self, field) is not None:
                raise ValueError(f"{field}: not with stream_tokens ({why})")
        if self.finetune_steps:
            raise ValueError("finetune_steps: not with stream_tokens (fine-tune the stream's output with init)")
        if self.qkv_source != "full":
            raise ValueError("qkv_source: the streaming stage trains on the full model's Q/K/V")
        if self.stream_tokens < self.seq_len:
            raise ValueError(f"stream_tokens: must be at least seq_len ({self.seq_len})")
        if self.stream_warmup >= self.stream_tokens // self.seq_len:
            raise ValueError(f"stream_warmup: must be below the planned windows ({self.stream_tokens // self.seq_len} "
                             f"of seq_len {self.seq_len})")

    def stream_policies(self) -> list[str]:
        return list(self.policies or [self.policy])

    def stream(self, model_id: str, data_sha256: str, dev_sha256: str) -> StreamConfig:
        return StreamConfig(model=model_id, policies=self.stream_policies(), budget=self.budget, rank=self.rank,
                            hidden=self.hidden, chunk=self.chunk, recent=self.recent, sink=self.sink, seed=self.seed,
                            seq_len=self.seq_len, tokens=self.stream_tokens, lr=self.lr, warmup=self.stream_warmup,
                            lr_floor=self.stream_lr_floor, query_chunks=self.query_chunks,
                            eval_every=self.stream_eval_every, checkpoint_every=self.stream_checkpoint_every,
                            export_every=self.stream_export_every, dev_seqs=self.dev_seqs,
                            dev_query_chunks=self.stream_dev_chunks, data_sha256=data_sha256, dev_sha256=dev_sha256)

    def layerwise(self, model_id: str, data_sha256: str, command: str, extra: dict) -> TrainConfig:
        return TrainConfig(model=model_id, data_sha256=data_sha256, command=command, extra=extra,
                           **self.model_dump(include=set(TrainConfig.model_fields) & set(TrainLessConfig.model_fields)
                                             - {"model"}))

    def finetune(self) -> FinetuneConfig:
        return FinetuneConfig(steps=self.finetune_steps, lr=self.finetune_lr, eval_every=self.finetune_eval_every,
                              schedule=self.finetune_schedule, warmup=self.finetune_warmup,
                              dropout=self.finetune_dropout, patience=self.finetune_patience, bf16=self.finetune_bf16,
                              seed=self.seed)
