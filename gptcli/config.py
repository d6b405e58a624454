"""Typed configuration: three dataclasses loaded from YAML, validated once.

A YAML file has the sections ``model``, ``data`` and ``train``; each key equals a
dataclass field (the book's names where the book has one). ``load_config`` is the
one place where precedence is decided: command-line flag > YAML > default.
Every problem raises ``ConfigError`` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from gptcli.errors import InputError


class ConfigError(InputError, ValueError):
    """A config value is unknown, of the wrong type or out of range.

    Also a ValueError, the standard type for a bad value, so callers that catch
    ValueError around a config construction (e.g. `weights.config_from_hf`) catch it.
    """


# torch.manual_seed takes what fits 64 bits, signed or unsigned; anything else is its RuntimeError.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed: int, where: str) -> None:
    """Raise ConfigError, naming `where` (a flag or config key), for a seed torch cannot take."""
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"{where}: a seed must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {seed}")


MAX_THREADS = 4096  # train.num_threads: above the hardware threads of the largest machines (768 on two 192-core EPYC)


@dataclass
class ModelConfig:
    # Defaults are the book's GPT_CONFIG_124M with the chapter-5 context of 256.
    vocab_size: int = 50257  # GPT-2 BPE vocabulary
    context_length: int = 256  # longest sequence the position embedding covers
    emb_dim: int = 768  # width of the residual stream
    n_heads: int = 12  # attention heads per block; must divide emb_dim
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.1  # dropout on embeddings, attention weights and residuals
    qkv_bias: bool = False  # bias in W_query/W_key/W_value (OpenAI's GPT-2 has it)
    gelu: Literal["exact", "tanh"] = "exact"  # nn.GELU() or the book's/GPT-2's tanh approximation
    # "book" computes op for op what the book's code computes (bit-identical runs);
    # "fused" uses scaled_dot_product_attention, F.layer_norm and F.gelu (faster, same math).
    impl: Literal["book", "fused"] = "book"
    # Round the embedding/output matrices up to a multiple of this for faster matmuls;
    # logits and checkpoints keep vocab_size rows (1 = no padding).
    pad_vocab_multiple: int = 1
    # Initial weights: "book" = PyTorch's defaults in the book's creation order (the book's
    # model for one seed); "gpt2" = GPT-2's normal(0, 0.02) with depth-scaled residual projections.
    init: Literal["book", "gpt2"] = "book"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "pad_vocab_multiple"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ConfigError(
                f"model.emb_dim: {self.emb_dim} is not divisible by model.n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate: must be in [0, 1), got {self.drop_rate}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    def shape(self) -> dict[str, Any]:
        """The fields that fix the parameter shapes (what a checkpoint must match)."""
        return {k: getattr(self, k) for k in SHAPE_FIELDS}


# Fields that decide the weights' shapes; the others may change between runs of one model.
SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")


@dataclass
class DataConfig:
    # A UTF-8 text file, a folder of .txt files, or a folder made by `gptcli prepare`; or a
    # mixture of prepared folders, [{path: ..., weight: 0.7}, ...], drawn in those proportions.
    # The default is the book's corpus, downloaded and sha256-checked when missing.
    path: Any = "data/the-verdict.txt"
    train_ratio: float = 0.90  # the book splits the text by character: first 90 % trains (prepared dirs: unused)
    stride: Optional[int] = None  # window step in tokens; None = context_length (the book's choice)
    # "sliding": the book's windows at every `stride`, shuffled each epoch;
    # "random": windows at random offsets (for prepared corpora too large to enumerate).
    sampling: Literal["sliding", "random"] = "sliding"
    # Document-aware attention on prepared corpora: a window spanning several documents gets a
    # block-causal mask (no token attends across a document boundary). Off: the book's numbers.
    document_mask: bool = False
    reset_positions: bool = False  # with document_mask: position ids restart at each document

    def __post_init__(self) -> None:
        if isinstance(self.path, list):
            self.path = [_mixture_entry(entry, i) for i, entry in enumerate(self.path)]
            if not self.path:
                raise ConfigError("data.path: an empty mixture; give a path or a list of {path, weight}")
            if self.sampling != "sliding":
                raise ConfigError(f"data.sampling: {self.sampling} is not supported for a mixture (data.path is a list); use sliding")
        elif not isinstance(self.path, str):
            raise ConfigError(f"data.path: expected a path or a list of {{path, weight}}, got {self.path!r}")
        if self.reset_positions and not self.document_mask:
            raise ConfigError("data.reset_positions: needs data.document_mask: true")
        if not 0.0 < self.train_ratio < 1.0:
            raise ConfigError(f"data.train_ratio: must be in (0, 1), got {self.train_ratio}")
        if self.stride is not None and self.stride <= 0:
            raise ConfigError(f"data.stride: must be positive, got {self.stride}")


def _mixture_entry(entry: Any, i: int) -> dict[str, Any]:
    """One source of a mixture, checked: {path: str, weight: number > 0}."""
    name = f"data.path[{i}]"
    if not isinstance(entry, dict) or set(entry) != {"path", "weight"}:
        raise ConfigError(f"{name}: expected {{path: ..., weight: ...}}, got {entry!r}")
    path = _coerce(entry["path"], str, f"{name}.path")
    weight = _coerce(entry["weight"], float, f"{name}.weight")
    if weight <= 0:
        raise ConfigError(f"{name}.weight: must be positive, got {entry['weight']}")
    return {"path": path, "weight": weight}


LOGGERS = ("tensorboard", "wandb", "mlflow")  # train.loggers: the trackers gptcli/loggers.py feeds


@dataclass
class TrainConfig:
    # Defaults are the book's chapter-5 run (train_model_simple with AdamW).
    seed: int = 123  # torch.manual_seed before the model is built
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    out_dir: Optional[str] = None  # run directory; None = checkpoints/<config file stem>
    num_epochs: int = 10  # passes over the training windows
    max_steps: Optional[int] = None  # stop after this many optimizer steps
    max_tokens: Optional[int] = None  # stop once this many training tokens were seen
    batch_size: int = 2  # windows per micro-batch (per process)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 0.0004  # peak learning rate
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: linear warmup, cosine decay
    warmup_steps: int = 0  # linear warmup steps (cosine schedule)
    min_lr: float = 0.0  # floor of the cosine decay
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    decay_matrices_only: bool = False  # no weight decay on biases, norms (GPT-2/nanoGPT practice)
    beta1: float = 0.9  # AdamW betas (PyTorch defaults, as the book uses)
    beta2: float = 0.999
    optimizer_impl: Literal["default", "foreach", "fused"] = "default"  # PyTorch AdamW kernel
    grad_clip: Optional[float] = None  # clip the global gradient norm to this (None = off)
    eval_freq: int = 5  # evaluate every this many steps (the book: 5)
    eval_iter: Optional[int] = 5  # batches per split per evaluation; None = the whole split
    start_context: str = "Every effort moves you"  # prompt of the greedy sample after each epoch
    max_new_tokens: int = 50  # new tokens in that sample (0 = no sample); was sample_tokens
    log_freq: int = 1  # write a metrics line every this many steps; was log_every
    save_freq: Optional[int] = 50  # checkpoint every this many steps (and always at the end); was save_every
    keep_last: int = 3  # step checkpoints kept (the best one is kept as well)
    # Autocast dtype (weights and optimizer stay fp32): auto = bf16 where the device computes it
    # natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), fp16 + gradient scaler on older CUDA GPUs,
    # fp32 elsewhere. fp16 = autocast with torch.amp.GradScaler (overflowing steps are skipped).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # Training loss in slices of this many (B*T) rows, so the B x T x V logits never exist at once:
    # 0 = the plain loss over full logits; auto = chunked, except the book-exact model.impl book.
    loss_chunk: Any = "auto"
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: torch.optim.Muon for the blocks' matrices, AdamW for the rest
    # Muon's settings (only with optimizer: muon): {lr, momentum, nesterov, ns_steps, weight_decay,
    # adjust_lr_fn}; a key left out takes gptcli.optim.MUON_DEFAULTS (lr, weight_decay: the AdamW values).
    muon: Optional[dict] = None
    compile: bool = False  # torch.compile the model
    # Step each parameter inside backward as soon as its gradient is complete and free that gradient,
    # so all gradients never exist at once (same numbers). Less peak memory where gradients weigh more
    # than activations (small batches), more where activations dominate (the step's temporaries join
    # them): measured, hence off by default. Refused with grad_clip, grad_accum_steps > 1, torchrun,
    # fp16 or a deferred non-finite check.
    optimizer_in_backward: bool = False
    activation_checkpointing: bool = False  # recompute blocks in backward to save memory
    num_threads: Optional[int] = None  # CPU threads for torch; None = PyTorch's choice
    # Host (CPU) memory policy of glibc's malloc; numerics never change. "return": buffers of
    # 1 MiB or more get their own mapping and go back to the OS when freed, so the heap does
    # not fragment (about a fifth less peak memory for the 124M model on CPU). "retain": keep
    # freed memory for reuse, no page faults on the per-step buffers (faster; the resident
    # size stays at its peak). "default": glibc's own choice.
    host_memory: Literal["default", "return", "retain"] = "default"
    peak_flops: Optional[float] = None  # device peak FLOP/s for MFU; None = measured and cached
    tf32: Optional[bool] = None  # TF32 matmuls on CUDA, for this run only; None = on with model.impl fused
    distributed: Literal["ddp", "fsdp"] = "ddp"  # wrapper when launched with torchrun
    # Multiple-choice tasks scored at evaluations (accuracy in metrics.jsonl): task names (hellaswag,
    # choices) or mappings {name, data: JSON Lines file, limit: first N items}; [] = none.
    eval_tasks: Any = field(default_factory=list)
    eval_tasks_every: Optional[int] = None  # score eval_tasks every this many steps (a multiple of eval_freq); None = at each evaluation
    # Experiment trackers fed beside metrics.jsonl (rank 0): any of tensorboard, wandb, mlflow (loggers.py).
    loggers: Any = field(default_factory=list)
    logger_timeout: float = 60.0  # seconds one tracker call may take before that tracker is dropped

    def __post_init__(self) -> None:
        check_seed(self.seed, "train.seed")
        self.eval_tasks = _eval_task_specs(self.eval_tasks)
        for name in ("num_epochs", "batch_size", "grad_accum_steps", "eval_freq", "log_freq", "keep_last"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be positive, got {getattr(self, name)}")
        if self.eval_tasks_every is not None and (self.eval_tasks_every <= 0 or self.eval_tasks_every % self.eval_freq):
            raise ConfigError(f"train.eval_tasks_every: must be a positive multiple of train.eval_freq ({self.eval_freq}) "
                              f"or null, got {self.eval_tasks_every}")
        for name in ("max_steps", "max_tokens", "eval_iter", "save_freq", "num_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{name}: must be positive or null, got {value}")
        if self.num_threads is not None and self.num_threads > MAX_THREADS:  # beyond any machine; torch overflows
            raise ConfigError(f"train.num_threads: at most {MAX_THREADS} (null: PyTorch's choice), got {self.num_threads}")
        for name in ("warmup_steps", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must not be negative, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate: must be positive, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"train.min_lr: must be in [0, learning_rate], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must not be negative, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip: must be positive or null, got {self.grad_clip}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"train.peak_flops: must be positive or null, got {self.peak_flops}")
        if not (self.loss_chunk == "auto" or (isinstance(self.loss_chunk, int) and not isinstance(self.loss_chunk, bool)
                                              and self.loss_chunk >= 0)):
            raise ConfigError(f"train.loss_chunk: must be auto, 0 (the plain loss) or a positive number of rows, "
                              f"got {self.loss_chunk!r}")
        if self.muon is not None:
            _check_muon(self.muon, self.optimizer)
        if self.logger_timeout <= 0:
            raise ConfigError(f"train.logger_timeout: must be positive, got {self.logger_timeout}")
        if not isinstance(self.loggers, list) or not all(isinstance(n, str) and n in LOGGERS for n in self.loggers):
            raise ConfigError(f"train.loggers: expected a list of {', '.join(LOGGERS)} (e.g. [tensorboard, wandb]), "
                              f"got {self.loggers!r}")
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"train.loggers: {self.loggers!r} names a logger twice")


# train.muon's keys and the type each must have (defaults: gptcli.optim.MUON_DEFAULTS).
MUON_KEYS = {"lr": float, "momentum": float, "nesterov": bool, "ns_steps": int, "weight_decay": float,
             "adjust_lr_fn": str}


def _check_muon(muon: dict, optimizer: str) -> None:
    """Validate train.muon in place (ints taken as floats where floats are expected)."""
    if optimizer != "muon":
        raise ConfigError(f"train.muon: applies only with train.optimizer muon (it is {optimizer}); remove it "
                          "or set train.optimizer: muon")
    for key, value in muon.items():
        if key not in MUON_KEYS:
            raise ConfigError(f"train.muon.{key}: unknown key (valid: {', '.join(MUON_KEYS)})")
        if value is None and key in ("lr", "weight_decay"):
            continue
        muon[key] = _coerce(value, MUON_KEYS[key], f"train.muon.{key}")
    for key in ("lr", "ns_steps"):
        if muon.get(key) is not None and muon[key] <= 0:
            raise ConfigError(f"train.muon.{key}: must be positive, got {muon[key]}")
    if muon.get("weight_decay") is not None and muon["weight_decay"] < 0:
        raise ConfigError(f"train.muon.weight_decay: must not be negative, got {muon['weight_decay']}")
    if "momentum" in muon and not 0 <= muon["momentum"] < 1:  # as train.beta1: a momentum of 1 or more never decays
        raise ConfigError(f"train.muon.momentum: must be in [0, 1), got {muon['momentum']}")
    if muon.get("adjust_lr_fn", "original") not in ("original", "match_rms_adamw"):
        raise ConfigError(f"train.muon.adjust_lr_fn: must be original or match_rms_adamw, got {muon['adjust_lr_fn']!r}")


def _eval_task_specs(value: Any) -> list[dict[str, Any]]:
    """train.eval_tasks as [{name, data, limit}]; the names and files are checked when a run starts (tasks.py)."""
    if not isinstance(value, list):
        raise ConfigError(f"train.eval_tasks: expected a list of task names or {{name, data, limit}}, got {value!r}")
    specs = []
    for i, entry in enumerate(value):
        key = f"train.eval_tasks[{i}]"
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{key}: expected a task name or a mapping with name, got {entry!r}")
        unknown = set(entry) - {"name", "data", "limit"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key (valid: data, limit, name)")
        data, limit = entry.get("data"), entry.get("limit")
        if data is not None and not isinstance(data, str):
            raise ConfigError(f"{key}.data: expected a path, got {data!r}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ConfigError(f"{key}.limit: must be a positive integer or null, got {limit!r}")
        specs.append({"name": entry["name"], "data": data, "limit": limit})
    return specs


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where the values came from (a file path or "<defaults>"); not a YAML key.
    source: str = field(default="<defaults>", compare=False)
    # Which source gave each dotted key ("data.path" -> "configs/x.yaml"), for messages; not a YAML key.
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # One line per deprecated key the sources used (see RENAMED_KEYS), for the caller to show; not a YAML key.
    warnings: list[str] = field(default_factory=list, compare=False, repr=False)

    def origin(self, key: str) -> str:
        """Where the value of dotted `key` came from: a file, --set, the command line, or the default."""
        return self.origins.get(key, "the default")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# The config keys that hold paths: relative values in a YAML file are relative to that file's folder.
PATH_KEYS = ("data.path", "train.out_dir")

# Keys renamed for one spelling per concept (the book's eval_freq and max_new_tokens), old -> new.
# A source that still uses an old key works; the config's `warnings` name the new spelling.
RENAMED_KEYS = {
    "train.sample_tokens": "train.max_new_tokens",
    "train.log_every": "train.log_freq",
    "train.save_every": "train.save_freq",
}


def _rename_keys(values: dict[str, dict[str, Any]], source: str) -> list[str]:
    """Spell the deprecated keys of `values` anew, in place; one warning for each.

    Raises:
        ConfigError: a source gives a key under both its old and its new name.
    """
    warnings = []
    for old, new in RENAMED_KEYS.items():
        section, _, old_key = old.partition(".")
        keys = values.get(section) or {}
        if old_key in keys:
            new_key = new.partition(".")[2]
            if new_key in keys:
                raise ConfigError(f"{source}: {old} and {new}: one key under two names; keep {new}")
            keys[new_key] = keys.pop(old_key)
            warnings.append(f"{source}: {old} is deprecated; use {new}")
    return warnings


@dataclass
class Layer:
    """One source of config values: a YAML file, the `--set` list or the dedicated flags."""

    source: str  # how messages name it: the file's path, "--set", a flag ("--max-steps")
    values: dict[str, dict[str, Any]]  # section -> key -> value, only the keys this source gave
    warnings: list[str] = field(default_factory=list)  # deprecated keys it used, spelled anew in `values`

    def __post_init__(self) -> None:
        self.warnings += _rename_keys(self.values, self.source)


def config_layers(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> list[Layer]:
    """What the user gave, lowest precedence first: the YAML file, then `--set` strings, then flags.

    Paths are made usable from any folder here: ``~`` is expanded, and a relative path
    in a YAML file is taken relative to the file's folder (in `--set` and flags: to the
    working directory).

    Raises:
        ConfigError: naming the file (or ``--set``) and the key that is wrong.
    """
    layers = []
    if path is not None:
        layers.append(Layer(str(path), _checked(_read_yaml(Path(path)), str(path))))
        _anchor_paths(layers[-1].values, Path(path).expanduser().resolve().parent)
    set_values: dict[str, dict[str, Any]] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
        except yaml.YAMLError:
            value = text
        _merge(set_values, _dotted(key.strip(), value, "--set"), "--set")
    if set_values:
        layers.append(Layer("--set", set_values))
    for key, value in (overrides or {}).items():  # one layer per flag, so that messages name the flag
        if value is not None:
            flag = flag_name(key)
            values: dict[str, dict[str, Any]] = {}
            _merge(values, _dotted(key, value, flag), flag)
            layers.append(Layer(flag, values))
    for layer in layers[1 if path is not None else 0:]:
        _anchor_paths(layer.values, None)
    return layers


def flag_name(key: str) -> str:
    """The dedicated flag of dotted config `key`: the field's name with dashes (data.path: --data)."""
    return "--data" if key == "data.path" else "--" + key.partition(".")[2].replace("_", "-")


def build_config(layers: list[Layer], base: Config | None = None) -> Config:
    """Apply `layers` (lowest precedence first) on `base` (default: the dataclass defaults).

    Raises:
        ConfigError: the message names the source that gave the bad value (a file, ``--set``)
            and the field.
    """
    raw: dict[str, dict[str, Any]] = base.to_dict() if base is not None else {name: {} for name in SECTIONS}
    origins: dict[str, str] = dict(base.origins) if base is not None else {}
    for layer in layers:
        _merge(raw, layer.values, layer.source)
        for section, values in layer.values.items():
            origins.update({f"{section}.{key}": layer.source for key in values or {}})
    default_source = base.source if base is not None else "<defaults>"
    try:
        sections = {name: _build(cls, raw[name], name) for name, cls in SECTIONS.items()}
    except ConfigError as e:
        key = re.match(r"[a-z_]+\.[a-z_0-9]+", str(e))
        fallback = layers[-1].source if layers else default_source  # a check across keys: the last source
        where = origins.get(key.group(0), fallback) if key else fallback
        raise ConfigError(f"{where}: {e}") from None
    files = [layer.source for layer in layers if not layer.source.startswith("--")]
    warnings = (base.warnings if base is not None else []) + [w for layer in layers for w in layer.warnings]
    return Config(**sections, source=files[-1] if files else default_source, origins=origins, warnings=warnings)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | tuple[str, ...] = (),
) -> Config:
    """Resolve a config: defaults, then the YAML file, then `--set` strings, then flags.

    Args:
        path: a YAML file with sections model/data/train, or None for the defaults.
        overrides: dotted keys from dedicated command-line flags, e.g.
            ``{"train.max_steps": 10}``; a value of None means "flag not given".
        sets: ``section.key=value`` strings from ``--set``; values are parsed as YAML.

    Raises:
        ConfigError: naming the file (or the flag) and the field that is wrong.
    """
    return build_config(config_layers(path, overrides, sets))


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Build a Config from an already-parsed mapping (e.g. a checkpoint's config.yaml)."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    _merge(raw, data, source)
    warnings = _rename_keys(raw, source)
    try:
        sections = {name: _build(cls, raw[name], name) for name, cls in SECTIONS.items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    origins = {f"{s}.{k}": source for s, values in raw.items() for k in values}
    return Config(**sections, source=source, origins=origins, warnings=warnings)


def map_paths(value: Any, fn) -> Any:
    """Apply `fn` to a path value: a path string, or each source's path of a mixture list."""
    if isinstance(value, str) and value:
        return fn(value)
    if isinstance(value, list):
        return [{**e, "path": fn(e["path"])} if isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]
                else e for e in value]
    return value


def _anchor_paths(values: dict[str, dict[str, Any]], folder: Path | None) -> None:
    """Expand ``~`` in path keys; resolve a relative one against `folder` (None: leave it relative)."""

    def anchor(value: str) -> str:
        p = Path(value).expanduser()
        if folder is not None and not p.is_absolute():
            p = (folder / p).resolve()
        return str(p)

    for dotted in PATH_KEYS:
        section, _, key = dotted.partition(".")
        if key in (values.get(section) or {}):
            values[section][key] = map_paths(values[section][key], anchor)
    tasks = (values.get("train") or {}).get("eval_tasks")
    for entry in tasks if isinstance(tasks, list) else []:  # train.eval_tasks[i].data, like data.path
        if isinstance(entry, dict) and isinstance(entry.get("data"), str):
            entry["data"] = anchor(entry["data"])


def _checked(data: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """The YAML mapping as sections, refusing unknown sections and non-mapping ones."""
    out: dict[str, dict[str, Any]] = {}
    _merge(out, data, source)
    return out


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML that `load_config` reads back unchanged."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return data


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):
                continue  # a list or mapping as a key: SafeLoader's own construct_mapping refuses it, with its line
            if key in seen:
                raise _DuplicateKey(f"duplicate key {key!r} at line {line} (first at line {seen[key]}); give each key once")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _dotted(key: str, value: Any, source: str) -> dict[str, Any]:
    section, dot, name = key.partition(".")
    if not dot or not name:
        raise ConfigError(f"{source}: {key!r} must be section.key (sections: {', '.join(SECTIONS)})")
    return {section: {name: value}}


def _merge(raw: dict[str, dict[str, Any]], data: dict[str, Any], source: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r} (expected {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section}: expected a mapping of keys")
        raw.setdefault(section, {}).update(values)


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown key (valid: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against a field's annotation; ints are accepted where floats are."""
    if hint is Any:
        return value  # checked by the dataclass's __post_init__
    if hint in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads 4e-4 (no dot) as a string; YAML 1.2 reads a number
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{name}: must be one of {choices}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 in YAML is a float; accept it where it is whole
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")) or abs(value) > sys.float_info.max:
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is dict:
        if isinstance(value, dict):
            return dict(value)  # its keys are checked by the dataclass's __post_init__
        raise ConfigError(f"{name}: expected a mapping of keys, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {hint!r} for {name}")  # a bug in this module
