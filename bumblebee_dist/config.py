"""Typed configuration: model presets, data, training and fine-tuning settings.

Every field has one line of documentation and a range check that names it. A run's config is
built from a preset, then a YAML or JSON file, then ``section.field=value`` overrides from the
command line, and is stored resolved with the run. The DeepSpeed JSON is generated from it
(``bumblebee_dist.train.engine``); there is no second source of truth.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bumblebee_dist.tokens import NUM_FEATURES


class ConfigError(ValueError):
    """An invalid config value; the message names the field, the value and the allowed range."""


def _check(condition: bool, name: str, value: Any, rule: str) -> None:
    if not condition:
        raise ConfigError(f"{name}={value!r} is invalid: {rule}")


@dataclass
class ModelConfig:
    """Encoder size and shape."""

    num_layers: int = 8  # transformer blocks
    hidden_size: int = 768  # model width D
    num_heads: int = 16  # attention heads N; D must be divisible by N
    ffn_size: int = 3072  # feed-forward inner width
    num_features: int = NUM_FEATURES  # particle features F
    dropout: float = 0.0  # dropout on attention output and feed-forward
    layer_norm_eps: float = 1e-12

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_size", "num_features"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"model.{name}", value, "must be a positive int")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size", self.hidden_size,
               f"must be divisible by model.num_heads={self.num_heads}")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must lie in [0, 1)")


MODEL_PRESETS = {
    # 8 layers, width 768, 16 heads, feed-forward 3072: about 57M parameters.
    "paper": ModelConfig(),
    # Same code path, sized for the CPU demo.
    "small": ModelConfig(num_layers=4, hidden_size=128, num_heads=4, ffn_size=512),
    # Tests only.
    "tiny": ModelConfig(num_layers=2, hidden_size=32, num_heads=2, ffn_size=64),
}


def model_preset(name: str) -> ModelConfig:
    """Return a fresh copy of the named model preset."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown; valid presets: {sorted(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name])


@dataclass
class DataConfig:
    """Data set location and batching of events."""

    path: str = "runs/demo/data"  # data set folder holding manifest.json
    max_tokens: int = 4096  # token budget of one micro-batch per rank
    max_jets: int = 8  # reco jets kept per event, highest pT first
    num_workers: int = 0  # loader worker processes per rank
    skip_corrupt_shards: bool = False  # skip and count bad shards instead of stopping

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        _check(self.max_tokens >= 64, "data.max_tokens", self.max_tokens, "must be at least 64")
        _check(self.max_jets >= 2, "data.max_jets", self.max_jets, "must be at least 2")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")


@dataclass
class TrainConfig:
    """Optimizer, schedule, parallelism and checkpointing."""

    run_dir: str = "runs/demo/pretrain"  # checkpoints, logs and the MLflow store go here
    seed: int = 1234  # run seed: masking draw, loader order, initialization
    epochs: int = 1  # passes over the training split
    max_steps: int = 0  # optimizer steps; 0 means run all epochs
    lr: float = 3e-4  # peak learning rate of AdamW
    weight_decay: float = 0.01  # AdamW weight decay, applied to weight matrices only
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    warmup_steps: int = 20  # linear warmup, then cosine decay to min_lr_ratio of peak
    min_lr_ratio: float = 0.1  # learning rate at the last step, as a fraction of train.lr
    grad_clip: float = 1.0  # global gradient norm clip; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0, 1, 2 or 3
    # ZeRO-3 keeps parameters of at most this many elements whole on every rank and partitions
    # the larger ones; DeepSpeed 0.19's default is 100000. 0 partitions every parameter.
    zero3_param_persistence_threshold: int = 100_000
    precision: str = "auto"  # "fp32", "bf16", or "auto" (bf16 on GPU, fp32 on CPU)
    log_every: int = 10  # optimizer steps between log lines
    checkpoint_every: int = 100  # optimizer steps between checkpoints; 0 means only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    val_every: int = 100  # optimizer steps between validation passes; 0 means only at the end
    val_max_batches: int = 0  # validation batches per rank and pass; 0 means the whole split

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        _check(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", self.max_steps, "must be >= 0")
        _check(math.isfinite(self.lr) and self.lr > 0, "train.lr", self.lr,
               "must be a finite number > 0")
        _check(0 <= self.seed < 2**32, "train.seed", self.seed, "must lie in [0, 2**32)")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"train.{name}", value, "must lie in [0, 1)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio,
               "must lie in [0, 1]")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        _check(self.zero3_param_persistence_threshold >= 0,
               "train.zero3_param_persistence_threshold", self.zero3_param_persistence_threshold,
               "must be >= 0 (0 partitions every parameter)")
        _check(self.precision in ("auto", "fp32", "bf16"), "train.precision", self.precision,
               "must be 'auto', 'fp32' or 'bf16'")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.val_every >= 0, "train.val_every", self.val_every, "must be >= 0")
        _check(self.val_max_batches >= 0, "train.val_max_batches", self.val_max_batches, "must be >= 0")


@dataclass
class FinetuneConfig:
    """Fine-tuning task and the pre-trained model it starts from."""

    task: str = "toponium"  # "toponium" (eta_t vs ttbar) or "initial_state" (gg vs qqbar)
    pretrained: str = ""  # models:/name@alias, models:/name/version, or a .safetensors path; "" = scratch

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        _check(self.task in ("toponium", "initial_state"), "finetune.task", self.task,
               "must be 'toponium' or 'initial_state'")


@dataclass
class TrackingConfig:
    """MLflow store and naming."""

    uri: str = ""  # MLflow tracking URI; "" means sqlite:///<run_dir>/../mlflow.db
    artifact_dir: str = ""  # artifact folder of new experiments; "" means mlartifacts beside the store
    experiment: str = "bumblebee"
    run_name: str = ""  # "" lets MLflow choose
    registered_model: str = ""  # name to register the exported model under; "" skips registering
    # Aliases set on the newly registered version, comma-separated; "auto" sets "champion" when the
    # model has no champion yet and "challenger" otherwise.
    aliases: str = "auto"
    enabled: bool = True  # false: no MLflow calls at all
    retries: int = 6  # attempts per MLflow call before a tracking failure is logged and skipped

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        _check(bool(self.experiment), "tracking.experiment", self.experiment, "must not be empty")
        _check(self.retries >= 1, "tracking.retries", self.retries, "must be >= 1")


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model_preset: str = "small"
    model: ModelConfig = field(default_factory=lambda: model_preset("small"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "RunConfig":
        """Validate every section; return self so calls chain."""
        for section in (self.model, self.data, self.train, self.finetune, self.tracking):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, for JSON, YAML and MLflow params."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
             "finetune": FinetuneConfig, "tracking": TrackingConfig}


def _coerce(name: str, text: str, target_type: Any) -> Any:
    if target_type in (bool, "bool"):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name}={text!r} is invalid: expected true or false")
        return lowered in ("true", "1", "yes")
    for kind, caster in (("int", int), ("float", float)):
        if target_type in (caster, kind):
            try:
                return caster(text)
            except ValueError as error:
                raise ConfigError(f"{name}={text!r} is invalid: expected {kind}") from error
    return text


def _apply(config: RunConfig, section: str, key: str, value: Any) -> None:
    name = f"{section}.{key}"
    if section not in _SECTIONS:
        raise ConfigError(f"config section {section!r} in {name!r} is unknown; valid: {sorted(_SECTIONS)}")
    target = getattr(config, section)
    types = {f.name: f.type for f in dataclasses.fields(target)}
    if key not in types:
        raise ConfigError(f"config field {name!r} is unknown; valid fields: {sorted(types)}")
    if isinstance(value, str):
        value = _coerce(name, value, types[key])
    setattr(target, key, value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                preset: str | None = None) -> RunConfig:
    """Build a RunConfig from a preset, an optional YAML/JSON file and ``section.field=value`` overrides.

    The model preset is chosen, in order, by ``preset``, the file's ``model_preset`` key or the
    default "small"; explicit ``model.*`` values then override the preset's.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    preset_name = preset or data.pop("model_preset", None) or "small"
    data.pop("model_preset", None)
    config = RunConfig(model_preset=preset_name, model=model_preset(preset_name))
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            _apply(config, section, key, value)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is invalid: expected section.field=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(config, section, key, value)
    return config.validate()


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict`` output (for example a checkpoint's stored config)."""
    config = RunConfig(model_preset=data.get("model_preset", "small"))
    for section in _SECTIONS:
        for key, value in data.get(section, {}).items():
            _apply(config, section, key, value)
    return config.validate()
