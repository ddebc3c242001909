"""Run configs for ``launch/pretrain_gpt.py``: YAML files, ``key=value`` overrides, checked on load.

A run config has the sections of :class:`RunConfig`. Loading checks every key and type and names
the bad key (``model.hiden_size: unknown key; did you mean 'hidden_size'?``); :func:`check_layout`
then checks the parallel layout against a world size, all before any process group or model
exists. Overrides address keys by dotted path, list items by index, values in YAML syntax::

    training.train_iters=200  data.sources.0.weight=0.5  validation.targets=[]
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from inrun_megatron.config import PROJECTION_DTYPES, SCORING_PATHS, VALIDATION_SPLITS
from inrun_megatron.data.validation_sets import TargetSpec


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and what to do."""


# --------------------------------------------------------------------------------------
# the schema


@dataclass
class ModelSection:
    """The GPT's shape, with the field names of :class:`inrun_megatron.megatron.model.GPTShape`
    (megatron's names) plus the entry point's own: the vocabulary padding and the precision."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    ffn_hidden_size: int | None = None
    vocab_size: int | None = None  # default: the tokenizer's, padded like megatron pads it
    make_vocab_size_divisible_by: int = 128
    normalization: str = "LayerNorm"
    swiglu: bool = False
    add_bias_linear: bool = True
    share_embeddings_and_output_weights: bool = False
    position_embedding_type: str = "learned_absolute"
    recompute: bool = False
    precision: str = "fp32"  # bf16/fp16: megatron's Float16Module and mixed-precision optimizer
    dropout: float = 0.0
    init_method_std: float = 0.02


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False


@dataclass
class TrainingSection:
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    seed: int = 1234
    # megatron's per-token loss: each microbatch's masked token-loss sum, the gradients divided by the
    # token count of the whole global batch (docs/DESIGN.md §1.1); false: megatron's default loss
    calculate_per_token_loss: bool = False


@dataclass
class OptimizerSection:
    type: str = "adam"
    lr: float = 3.0e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # default: training.train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0


@dataclass
class SourceSection:
    name: str
    prefix: str  # an indexed dataset <prefix>.bin/.idx made by tools/preprocess_data.py
    weight: float | None = None


@dataclass
class DataSection:
    tokenizer: dict
    sources: list[SourceSection]
    split: str = "98,2,0"  # megatron's train,validation,test split of each source's documents
    cache_dir: str | None = None  # megatron's dataset indices; default <run_dir>/data_cache
    num_workers: int = 0
    # Train on these sample ids only (a file of ids, one per line, as `inrun-scores curate -o` writes),
    # in increasing order, repeated as often as training.train_iters needs; the ids index the
    # training dataset megatron builds for train_samples sequences (default train_iters x
    # global_batch_size): give the train_samples of the run whose ids they are.
    train_ids: str | None = None
    train_samples: int | None = None
    # megatron's GPTDataset options (docs/DESIGN.md §2.9): no token attends across an end-of-document
    # token (every batch carries megatron's [s, s] attention mask), and positions restart after one.
    # With the mask, a document's value (scoring.document_values) is the value of its own loss terms.
    reset_attention_mask: bool = False
    reset_position_ids: bool = False


@dataclass
class ValidationSection:
    targets: list[TargetSpec]


@dataclass
class ScoringSection:
    enabled: bool = True
    validation_split: str = "replicate"
    projection_dtype: str | None = None
    path: str = "auto"  # microbatch-gradient path at micro_batch_size 1, per-layer rules otherwise
    flush_every: int = 10  # score rows are written (one Parquet part per DP replica) every N steps
    # at the end, rank 0 merges the rows into accumulated values (RUN/merged, as `inrun-scores merge`);
    # a run with billions of rows merges faster offline: `mpirun -n N inrun-scores merge RUN -o OUT --mpi`
    merge_values: bool = True
    # with Adam, also record the Adam-aware value (docs/DESIGN.md §1.5); the analysis defaults to it
    optimizer_values: bool = True
    # also record each document's part of every packed sequence's score (docs/DESIGN.md §2.9), cut at
    # the tokenizer's end-of-document token: RUN/documents/, `inrun-scores by-document`; needs the rules path
    document_values: bool = False
    # also record each sample's curvature and second-order value (docs/DESIGN.md §1.7; rows T:curvature and
    # T:second-order, `inrun-scores ... --value second-order`): a curvature pass per step, about two more plain
    # steps of compute; fp32 weights only (model.precision fp32), not with document_values
    second_order: bool = False


@dataclass
class CheckpointSection:
    save_interval: int | None = None  # steps between checkpoints; None: only at the end
    dir: str | None = None  # default <run_dir>/checkpoints


@dataclass
class OutputSection:
    run_dir: str


@dataclass
class LoggingSection:
    log_interval: int = 10
    tensorboard: bool = False  # scalars under <run_dir>/tensorboard
    wandb_project: str | None = None


@dataclass
class RunConfig:
    model: ModelSection
    training: TrainingSection
    data: DataSection
    validation: ValidationSection
    output: OutputSection
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir) if self.data.cache_dir else self.run_dir / "data_cache"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Allowed values of string options (checked on load).
CHOICES = {
    "model.normalization": ("LayerNorm", "RMSNorm"),
    "model.position_embedding_type": ("learned_absolute", "rope"),
    "model.precision": ("fp32", "bf16", "fp16"),
    "optimizer.type": ("adam", "sgd"),
    "optimizer.lr_decay_style": ("constant", "linear", "cosine"),
    "scoring.validation_split": VALIDATION_SPLITS,
    "scoring.path": SCORING_PATHS,
    "scoring.projection_dtype": (None, *PROJECTION_DTYPES),
}

#: Sections a resumed run may change (``output``: a run directory may be moved); everything else
#: must match the checkpoint. Not the number of steps: megatron sizes (and so shuffles) its
#: datasets by it, which would remap sample ids.
RESUMABLE_CHANGES = (
    "output",
    "checkpoint",
    "logging",
    "scoring.flush_every",
    "scoring.merge_values",
    "data.num_workers",
)


# --------------------------------------------------------------------------------------
# loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (dataclass, list[...], X | None, scalars), else a ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(value, inner, where)
    if dataclasses.is_dataclass(tp):
        return _load_dataclass(value, tp, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, bool, str) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _load_dataclass(raw: Any, cls: type, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _convert(raw[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: missing (required)")
    for key, allowed in CHOICES.items():
        section, _, option = key.rpartition(".")
        if section == where and option in values and values[option] not in allowed:
            raise ConfigError(f"{key}: {values[option]!r} is not one of {list(allowed)}")
    return cls(**values)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` (YAML value) to a raw config dict."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected key=value, e.g. training.train_iters=100")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({e})") from e
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {assignment!r}: {here} is not an item of a {len(node)}-item list")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {assignment!r}: {here} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {assignment!r}: {key} is not an item of a {len(node)}-item list")
        node[int(last)] = value
    else:
        node[last] = value


def load_run_config(path: str | Path | None, overrides: list[str] = (), raw: dict | None = None) -> RunConfig:
    """Load a YAML run config (or a ``raw`` dict), apply overrides, check keys, types and values."""
    if raw is None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    for assignment in overrides:
        apply_override(raw, assignment)
    config = _load_dataclass(raw, RunConfig, "")
    check_values(config)
    return config


# --------------------------------------------------------------------------------------
# checks that need more than one key


def _positive(where: str, value: int | float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"{where}: must be positive, got {value}")


def check_values(c: RunConfig) -> None:
    """Checks that need no world size and no files."""
    m, p, t, o = c.model, c.parallel, c.training, c.optimizer
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "ffn_hidden_size", "vocab_size"):
        _positive(f"model.{name}", getattr(m, name))
    for name in ("micro_batch_size", "global_batch_size", "train_iters"):
        _positive(f"training.{name}", getattr(t, name))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size"):
        _positive(f"parallel.{name}", getattr(p, name))
    _positive("optimizer.lr", o.lr)
    _positive("scoring.flush_every", c.scoring.flush_every)
    _positive("data.train_samples", c.data.train_samples)
    if c.scoring.path == "microbatch" and t.micro_batch_size != 1:
        raise ConfigError(
            f"scoring.path: 'microbatch' scores each microbatch's gradient, one sequence's only with"
            f" training.micro_batch_size 1 (got {t.micro_batch_size}); use 'auto' or 'rules'"
        )
    if c.scoring.document_values and c.scoring.path == "microbatch":
        raise ConfigError(
            "scoring.document_values needs each token's part of the score, which only the per-layer rules give;"
            " scoring.path 'microbatch' sees one gradient per sequence: use 'auto' or 'rules'"
        )
    if c.scoring.second_order and m.precision != "fp32":
        raise ConfigError(
            f"scoring.second_order needs fp32 weights, got model.precision {m.precision!r}: its central difference"
            " moves the weights by about 3.5e-4 of their norm (the square root of fp32's machine epsilon,"
            " docs/DESIGN.md §1.7), below bf16/fp16 resolution; set model.precision: fp32 or"
            " scoring.second_order: false"
        )
    if c.scoring.second_order and c.scoring.document_values:
        raise ConfigError(
            "scoring.second_order and scoring.document_values cannot both be on: the curvature pass scores whole"
            " sequences, not document spans; set one of them to false"
        )
    _positive("logging.log_interval", c.logging.log_interval)
    _positive("checkpoint.save_interval", c.checkpoint.save_interval)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads"
            f" ({m.num_attention_heads})"
        )
    tp = p.tensor_model_parallel_size
    if tp > m.num_attention_heads or m.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size ({tp}) must divide model.num_attention_heads"
            f" ({m.num_attention_heads}): each tensor-parallel rank holds whole attention heads"
        )
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    if ffn % tp:
        raise ConfigError(f"the MLP width ({ffn}) must be divisible by parallel.tensor_model_parallel_size ({tp})")
    if m.vocab_size is not None and m.vocab_size % tp:
        raise ConfigError(f"model.vocab_size ({m.vocab_size}) must be divisible by the tensor-parallel size ({tp})")
    stages = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
    if m.num_layers % stages:
        raise ConfigError(
            f"model.num_layers ({m.num_layers}) must be divisible by the number of pipeline stages"
            f" (pipeline x virtual pipeline = {stages})"
        )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1")
    if p.use_distributed_optimizer and o.type != "adam":
        raise ConfigError("parallel.use_distributed_optimizer works with optimizer.type 'adam' only")
    if o.lr_warmup_iters < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError("optimizer: need lr_warmup_iters >= 0 and 0 <= min_lr <= lr")
    decay = o.lr_decay_iters or t.train_iters
    if o.lr_warmup_iters >= decay:
        raise ConfigError(
            f"optimizer.lr_warmup_iters ({o.lr_warmup_iters}) must be smaller than the decay length"
            f" (optimizer.lr_decay_iters, default training.train_iters: {decay})"
        )
    if c.data.reset_attention_mask and stages > 2:
        raise ConfigError(
            f"data.reset_attention_mask: the {stages} pipeline stages (pipeline x virtual pipeline) include some"
            " that hold neither the embedding nor the output layer, and megatron's pretraining hands batches, and"
            " so the attention mask, only to the first and the last stage; use at most 2 stages"
        )
    _check_data(c)


def _check_data(c: RunConfig) -> None:
    names = [s.name for s in c.data.sources]
    if not names:
        raise ConfigError("data.sources: give at least one source")
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: names must be unique, got {names}")
    for i, s in enumerate(c.data.sources):
        _positive(f"data.sources.{i}.weight", s.weight)
    if c.data.tokenizer.get("type") not in ("bytes", "json"):
        raise ConfigError(f"data.tokenizer.type: {c.data.tokenizer.get('type')!r} is not one of ['bytes', 'json']")
    if c.data.tokenizer.get("type") == "json" and not c.data.tokenizer.get("path"):
        raise ConfigError("data.tokenizer: type 'json' needs 'path' (a tokenizers JSON file)")
    unknown = set(c.data.tokenizer) - {"type", "path", "eod_token", "pad_token"}
    if unknown:
        raise ConfigError(
            f"data.tokenizer.{sorted(unknown)[0]}: unknown key; known keys: type, path, eod_token, pad_token"
        )
    try:
        split = [float(x) for x in c.data.split.split(",")]
    except ValueError:
        split = []
    if not 1 <= len(split) <= 3 or any(x < 0 for x in split) or sum(split) <= 0:
        raise ConfigError(f"data.split: {c.data.split!r} is not megatron's 'train,validation,test' weights")
    has_heldout = len(split) > 1 and split[1] > 0
    targets = c.validation.targets
    if c.scoring.enabled and not targets:
        raise ConfigError("validation.targets: scoring needs at least one validation target")
    seen = set()
    for i, spec in enumerate(targets):
        where = f"validation.targets.{i}"
        if spec.name in seen:
            raise ConfigError(f"{where}.name: {spec.name!r} is used twice; target names must be unique")
        seen.add(spec.name)
        if (spec.source is None) == (spec.jsonl is None):
            raise ConfigError(f"{where}: give exactly one of 'source' (a held-out slice) or 'jsonl' (a file)")
        if spec.source is not None:
            if spec.source not in names:
                raise ConfigError(f"{where}.source: {spec.source!r} is not one of data.sources {names}")
            if not has_heldout:
                raise ConfigError(
                    f"{where}: a held-out slice of {spec.source!r} needs a validation part in data.split"
                    f" (e.g. '98,2,0'), got {c.data.split!r}"
                )
            if spec.sequences is None or spec.sequences <= 0:
                raise ConfigError(f"{where}.sequences: how many held-out sequences (a positive number)")


@dataclass
class Layout:
    world_size: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    num_microbatches: int


def check_layout(c: RunConfig, world_size: int) -> Layout:
    """The parallel layout at ``world_size`` processes, or a ConfigError saying what does not fit."""
    p, t = c.parallel, c.training
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"the world size ({world_size} processes) is not divisible by tensor x pipeline parallel size"
            f" ({p.tensor_model_parallel_size} x {p.pipeline_model_parallel_size} = {model_parallel});"
            " start a multiple of that many processes or change parallel.*"
        )
    dp = world_size // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size ({t.global_batch_size}) must be divisible by micro_batch_size x"
            f" data-parallel size ({t.micro_batch_size} x {dp})"
        )
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if p.virtual_pipeline_model_parallel_size and n_micro % p.pipeline_model_parallel_size:
        raise ConfigError(
            f"the interleaved pipeline schedule needs the number of microbatches ({n_micro}) to be a multiple"
            f" of the pipeline size ({p.pipeline_model_parallel_size})"
        )
    return Layout(
        world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size, dp, n_micro,
    )  # fmt: skip


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        where = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, where + ".")
        elif a != b:
            out.append(where)
    return out


def unresumable_changes(old: dict, new: dict) -> list[str]:
    return [k for k in config_changes(old, new) if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]
