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
class InputSpec(_Strict):
    path: str = Field(description="JSONL file (local path or lab://...)")
    format: Literal["auto", "alpaca", "chat", "self_instruct"] = Field(
        default="auto",
        description="row format; auto detects per row (chat also accepts ShareGPT `conversations`)",
    )
    name: str | None = Field(default=None, description="source name in the ledger; default: file stem")


class CurateSpec(_Strict):
    kind: Literal["curate"] = "curate"
    inputs: list[InputSpec] = Field(min_length=1)
    output: str | None = Field(default=None, description="output folder; default: the run's folder")
    min_chars: int = Field(default=1, ge=0, description="rows whose assistant text is shorter are dropped")
    max_chars: int = Field(default=8000, gt=0, description="rows with more characters in total are dropped")
    exact_dedup: bool = True


# ---------------------------------------------------------------- train
class LoraSpec(_Strict):
    r: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class DebugSpec(_Strict):
    fail_at_step: int | None = Field(
        default=None, ge=1, description="fault injection: rank 0 crashes once after this step"
    )


class TrainSpec(_Strict):
    kind: Literal["train"] = "train"
    model: str | None = Field(default=None, description="HF id or local folder; default: pipeline model")
    data: str | None = Field(default=None, description="Parquet folder or JSONL; default: curate output")
    method: Literal["lora"] = "lora"
    lora: LoraSpec = LoraSpec()
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
    output: str | None = None
    debug: DebugSpec = DebugSpec()


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
class AdapterRef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    path: str


class ServeSpec(_Strict):
    kind: Literal["serve"] = "serve"
    model: str | None = None
    adapters: list[AdapterRef] = Field(default_factory=list, description="default: the train output")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    num_replicas: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    max_new_tokens_limit: int = Field(default=256, ge=1)
    smoke_prompts: list[str] = Field(default_factory=list, description="sent after start-up, answers printed")
    keep_alive: bool = Field(default=False, description="keep serving after the smoke prompts")


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
        return self

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
                file_ok(f"{pre}adapters.{j}.path", a.path)
    if problems:
        raise SpecError(source, problems)
