"""Export a trained model as one plain fp32 safetensors file, from any ZeRO stage.

An export folder contains ``model.safetensors`` (every key of the model's ``state_dict``, fp32,
full shapes) and ``config.json`` (the model config and what produced the weights). It loads into
``BumblebeeEncoder`` with ``load_exported`` and needs neither DeepSpeed nor pickle.

Where the weights come from:

- ZeRO-1 and ZeRO-2: the fp32 master weights held by the optimizer partitions, assembled
  with ``deepspeed.utils.safe_get_full_fp32_param`` (a collective);
- bf16 without ZeRO: the fp32 master copies of DeepSpeed's bf16 wrapper, which
  ``bumblebee_dist.train.engine.build_engine`` links to the parameters;
- ZeRO-3: the same for trained parameters, and ``deepspeed.zero.GatheredParameters`` for
  parameters the optimizer does not hold;
- fp32 without ZeRO: the parameters themselves, which are the fp32 weights.

Gathering is collective, so every rank calls ``gather_fp32_state_dict``; rank 0 alone receives
the state dict and writes files. Before anything is written, every tensor is compared with the
shape the model config implies: a partitioned placeholder (an empty or 1-element tensor where
more is expected) raises ExportError naming the parameter, and no file is written. Parameters
shared between modules (tied weights) are gathered once and written under each of their keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from bumblebee_dist.config import ModelConfig
from bumblebee_dist.train.engine import MASTER_ATTRIBUTE

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EXPORT_FORMAT = "bumblebee-encoder"
EXPORT_FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """An export would be wrong or incomplete; the message names the parameter or file."""


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _full_fp32(parameter: torch.nn.Parameter) -> torch.Tensor:
    """Return the full fp32 value of one parameter on the CPU (collective under ZeRO)."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(parameter, "ds_id"):  # ZeRO-3 partitioned parameter
        if parameter.requires_grad and getattr(parameter, "_z3_optimizer", None) is not None:
            return safe_get_full_fp32_param(parameter).detach().float().cpu()
        with zero.GatheredParameters([parameter], modifier_rank=None):
            return parameter.detach().float().cpu().clone()
    # ZeRO-1/2 or bf16 master weights. The attribute exists on every rank, but it is None on a
    # rank that has no fragment of the parameter, and that rank must still join the all-reduce.
    if parameter.requires_grad and hasattr(parameter, "_hp_mapping"):
        return safe_get_full_fp32_param(parameter).detach().float().cpu()
    # bf16 without ZeRO: the master copy linked by bumblebee_dist.train.engine.
    master = getattr(parameter, MASTER_ATTRIBUTE, None)
    if master is not None:
        return master.detach().float().cpu().clone()
    return parameter.detach().float().cpu().clone()


def gather_fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Gather the full fp32 ``state_dict`` of a (possibly DeepSpeed-wrapped) module.

    Collective: call on every rank. Returns the state dict on rank 0, in ``module.state_dict()``
    key order, and None on the other ranks. Persistent buffers are included as they are; ZeRO
    does not partition buffers.
    """
    values: dict[int, torch.Tensor] = {}
    names: dict[str, int] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) not in values:
            values[id(parameter)] = _full_fp32(parameter)
        names[name] = id(parameter)
    if not _is_main():
        return None
    state = {name: values[key].clone() for name, key in names.items()}
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        submodule = module.get_submodule(owner) if owner else module
        if leaf not in submodule._non_persistent_buffers_set:
            state[name] = buffer.detach().cpu().clone()
    reference_order = module.state_dict(keep_vars=True).keys()
    return {name: state[name].contiguous() for name in reference_order if name in state}


def expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every ``state_dict`` key of ``BumblebeeEncoder(model_config)``, without memory."""
    from bumblebee_dist.model import BumblebeeEncoder

    with torch.device("meta"):
        reference = BumblebeeEncoder(model_config, init_seed=None)
    return {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}


def check_state_dict(state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ExportError unless ``state`` has exactly the keys of ``shapes``, each at full shape."""
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ExportError(f"export is missing {len(missing)} keys of the model, first {missing[0]!r}")
    unexpected = sorted(set(state) - set(shapes))
    if unexpected:
        raise ExportError(f"export has {len(unexpected)} keys the model lacks, first {unexpected[0]!r}")
    for name, shape in shapes.items():
        got = tuple(state[name].shape)
        if got != shape:
            kind = "a partitioned placeholder" if state[name].numel() <= 1 else "a wrong shape"
            raise ExportError(
                f"parameter {name!r} has shape {got}, expected {shape}: {kind}. Gather it on "
                "every rank (gather_fp32_state_dict) before exporting; nothing was written")
        if not torch.isfinite(state[name]).all():
            raise ExportError(f"parameter {name!r} contains NaN or inf values; nothing was written")


def write_export(state: Mapping[str, torch.Tensor], model_config: ModelConfig,
                 out_dir: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Check ``state`` against ``model_config`` and write the export folder; return its path.

    Each file is written under a temporary name and renamed, so a crash leaves no partial file
    under a final name.
    """
    check_state_dict(state, expected_shapes(model_config))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().float().contiguous().cpu() for name, tensor in state.items()}
    weights_tmp = out_dir / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    config = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
              "model": _model_dict(model_config), **dict(metadata or {})}
    config_tmp = out_dir / f".{CONFIG_NAME}.tmp"
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(weights_tmp, out_dir / WEIGHTS_NAME)
    os.replace(config_tmp, out_dir / CONFIG_NAME)
    return out_dir


def _model_dict(model_config: ModelConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(model_config)


def export_model(module: torch.nn.Module, model_config: ModelConfig, out_dir: str | Path,
                 metadata: Mapping[str, Any] | None = None) -> Path | None:
    """Gather ``module`` (an engine's module at any ZeRO stage) and write the export folder.

    Collective: call on every rank. Returns the folder on rank 0 and None elsewhere.
    """
    state = gather_fp32_state_dict(module)
    if state is None:
        return None
    return write_export(state, model_config, out_dir, metadata)


def _export_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    weights = path if path.suffix == ".safetensors" else folder / WEIGHTS_NAME
    config = folder / CONFIG_NAME
    for required in (weights, config):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} not found; an export folder contains {WEIGHTS_NAME} and {CONFIG_NAME}")
    return weights, config


def read_export_config(path: str | Path) -> dict[str, Any]:
    """Return the ``config.json`` of an export folder (or of the folder of a .safetensors file)."""
    _, config_path = _export_paths(path)
    config = json.loads(config_path.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{config_path} is not a {EXPORT_FORMAT} export (format={config.get('format')!r})")
    return config


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    """Build a ``BumblebeeEncoder`` from an export folder or its .safetensors file.

    The state dict is loaded with ``strict=True``, so a missing or extra key is an error.
    """
    from bumblebee_dist.config import ModelConfig as _ModelConfig
    from bumblebee_dist.model import BumblebeeEncoder

    weights_path, _ = _export_paths(path)
    config = read_export_config(path)
    model = BumblebeeEncoder(_ModelConfig(**config["model"]), init_seed=None)
    model.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
    return model.to(device)
