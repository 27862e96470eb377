"""A Hugging Face model folder (``save_pretrained``: safetensors, config, generation config, tokenizer) from
a model trained on the ring, or from a ``ring-train`` checkpoint of one (``ring-export CHECKPOINT OUT_DIR``).

Parameters partitioned by ZeRO-3 are gathered one at a time with DeepSpeed's ``GatheredParameters`` (every
rank takes part, only the writer keeps a CPU copy); a DeepSpeed checkpoint (ZeRO 1-3) is consolidated with
DeepSpeed's ``zero_to_fp32`` after its files are verified against the manifest the run wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The prefix of the transformers model's weights in an HFCausalLM checkpoint (``HFCausalLM.model``).
MODULE_PREFIX = "model."
# The tag under which Lightning's DeepSpeed strategy saves a checkpoint folder.
DEEPSPEED_TAG = "checkpoint"


def gathered_state_dict(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The full CPU tensors of ``model``'s state dict (on the rank with ``keep``; others return {}).

    Collective under ZeRO-3: every rank must call it, the same parameters in the same order."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for name in model.state_dict().keys():
        tensor = named[name]
        gather = contextlib.nullcontext()
        if hasattr(tensor, "ds_id"):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
        with gather:
            if keep:
                out[name] = tensor.detach().to("cpu", copy=True)
    return out


def save_hf_folder(model: nn.Module, state_dict: dict[str, torch.Tensor], tokenizer: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` of ``model`` with ``state_dict`` (and ``tokenizer``, when given) into ``out_dir``,
    written beside it and renamed into place, so ``out_dir`` is complete or absent."""
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    config = model.config
    # Trained with use_cache=False; the folder is for generation too.
    saved = config.use_cache
    config.use_cache = True
    try:
        model.save_pretrained(partial, state_dict=state_dict)
    finally:
        config.use_cache = saved
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def _strip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers model's own keys of an HFCausalLM state dict (``model.`` prefix removed)."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("_forward_module.")
        if key.startswith(MODULE_PREFIX):
            out[key[len(MODULE_PREFIX):]] = value
    return out


def _read_checkpoint(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(transformers state dict, checkpoint dict without weights) of a verified ring-train checkpoint."""
    if checkpoint.is_file():
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return _strip(loaded.pop("state_dict")), loaded
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # The run wrote these files and their manifest verified every byte, so DeepSpeed's reader may open them.
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    # Lightning's own entries (hyper-parameters, ...) are in rank 0's model states (ZeRO-3: zero_pp_rank_0_...).
    states = sorted((checkpoint / DEEPSPEED_TAG).glob("*mp_rank_00_model_states.pt"))[0]
    client = torch.load(states, map_location="cpu", weights_only=True)
    return _strip(weights), client


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> Path:
    """The ``save_pretrained`` folder of the HF model in a ring-train ``checkpoint`` (a file, or a DeepSpeed
    folder), with the tokenizer ``tokenizer`` (default: the run's data.tokenizer, else the pretrained folder's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..callbacks.checkpoint_files import read_manifest, verify
    from ..models.hf_lightning_module import hf_config
    from ..models.hf_overrides import apply_config_overrides

    path = Path(checkpoint).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"CHECKPOINT={str(checkpoint)!r} does not exist")
    if read_manifest(path) is None:
        raise ValueError(f"CHECKPOINT={str(checkpoint)!r} has no manifest: only a checkpoint ring-train wrote "
                         "(with its .manifest.json beside it) is read")
    problem = verify(path)
    if problem is not None:
        raise ValueError(f"CHECKPOINT={str(checkpoint)!r} fails verification: {problem}")
    state_dict, meta = _read_checkpoint(path)
    hparams = meta.get("hyper_parameters") or {}
    if "pretrained" not in hparams:
        raise ValueError(f"CHECKPOINT={str(checkpoint)!r} is not a checkpoint of a model=hf run (no HF model in it)")
    if hparams.get("pretrained"):
        config = apply_config_overrides(AutoConfig.from_pretrained(hparams["pretrained"], local_files_only=True),
                                        hparams.get("config_overrides"))
    else:
        config = hf_config(hparams["config"])
    dtype = next(t.dtype for t in state_dict.values() if t.is_floating_point())
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ValueError(f"CHECKPOINT={str(checkpoint)!r} does not match its model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    source = tokenizer or (meta.get("datamodule_hyper_parameters") or {}).get("tokenizer") or hparams.get("pretrained")
    return save_hf_folder(model, gathered_state_dict(model, True), tokenizer_or_none(source), out_dir)


def tokenizer_or_none(folder: str | None) -> Any:
    if not folder or not Path(folder).is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError):
        return None  # a model folder without tokenizer files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ring-export", description="Write a Hugging Face model folder "
                                     "(save_pretrained) from a ring-train checkpoint of a model=hf run.")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a ring-train checkpoint (stepN.ckpt or last.ckpt)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run's)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.tokenizer)
    except ValueError as err:
        print(f"ring-export: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"ring-export: wrote {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()
