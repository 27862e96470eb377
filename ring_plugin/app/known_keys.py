"""Unknown config keys are errors: a key that nothing reads names itself and the closest valid key.

The valid keys are what the config groups' yaml files define (every option of every group, at the package it
lands in), the arguments of each ``_target_`` a node instantiates, and the GPT model's fields. They are read
from the files, so a group option or key added to ``conf/`` is known without a list to update here.

Free-form, so not checked here: ``model.config`` and ``model.config_overrides`` (a transformers config and
fields set on it, checked by transformers and ``models.hf_overrides``) and ``attention.kwargs`` (checked by
``RingAttentionConfig``). ``callbacks`` and ``logger`` take new entries
that name a ``_target_`` (``+callbacks.mine._target_=pkg.MyCallback``); their keys are that class's arguments.

Both ``ring-train`` and ``ring-plan`` call :func:`check_overrides` on the command line (before Hydra composes,
which otherwise suggests a ``+`` that would add the misspelt key) and :func:`check_config` on the composed
config (``+`` additions), before anything is built or any process starts.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from .config_checks import CONF_DIR, ConfigError

# Subtrees whose keys are someone else's to check.
FREE_FORM = ("model.config", "model.config_overrides", "attention.kwargs")
# Dicts of instantiable entries: a new entry is fine when it names a ``_target_``.
ENTRY_COLLECTIONS = ("callbacks", "logger")
# The GPT model group has no ``_target_``: its keys are these classes' arguments (see validate.model_kwargs).
MODEL_CLASSES = ("ring_plugin.models.GPTConfig", "ring_plugin.models.RingCausalLM")


def _is_hydra_node_key(key: str) -> bool:
    """Hydra's own node keys: ``_target_``, ``_convert_``, ``_partial_``, ..."""
    return len(key) > 2 and key.startswith("_") and key.endswith("_")


def _package(path: Path, conf_dir: Path) -> str:
    """Where a file's keys land: its group folder, or the root for ``# @package _global_`` and config.yaml."""
    head = path.read_text().split("\n", 3)[:3]
    if path.parent == conf_dir or any(line.strip() == "# @package _global_" for line in head):
        return ""
    return ".".join(path.relative_to(conf_dir).parent.parts)


@functools.lru_cache(maxsize=4)
def schema(conf_dir: Path = CONF_DIR) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
    """(every dotted key some yaml file defines, {dotted node: the ``_target_`` values it may have})."""
    keys: set[str] = set()
    targets: dict[str, set[str]] = {}

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            keys.add(full)
            if key == "_target_":
                targets.setdefault(prefix, set()).add(str(value))
            walk(value, full)

    for path in sorted(conf_dir.rglob("*.yaml")):
        if path.relative_to(conf_dir).parts[0] == "hydra":
            continue
        data = yaml.safe_load(path.read_text()) or {}
        data = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
        package = _package(path, conf_dir)
        if package:
            keys.update(".".join(package.split(".")[: i + 1]) for i in range(package.count(".") + 1))
        walk(data, package)
    for cls in MODEL_CLASSES:
        keys.update(f"model.{name}" for name in _arguments(cls) or ())
    return frozenset(keys), {k: frozenset(v) for k, v in targets.items()}


@functools.lru_cache(maxsize=64)
def _arguments(target: str) -> frozenset[str] | None:
    """The keyword arguments ``target`` takes; None when it takes any (``**kwargs``) or cannot be inspected."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except (ImportError, ValueError, AttributeError):
        return None
    # A class whose __init__ passes **kwargs on takes its bases' arguments too.
    functions = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    names: set[str] = set(_forwarded_arguments(obj))
    for function in functions:
        try:
            params = inspect.signature(function).parameters.values()
        except (ValueError, TypeError):
            return None
        names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return frozenset(names)
    return None


def _forwarded_arguments(obj: Any) -> frozenset[str]:
    """Arguments a class's ``**kwargs`` reach beyond its bases: Lightning's DDPStrategy hands them to torch's
    DistributedDataParallel (``strategy.find_unused_parameters``, ``strategy.static_graph``, ...)."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    if not (inspect.isclass(obj) and issubclass(obj, DDPStrategy)):
        return frozenset()
    params = inspect.signature(DistributedDataParallel.__init__).parameters.values()
    return frozenset(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "module"))


def _free_form(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in FREE_FORM)


def _accepted_by_target(parent: str, leaf: str, targets: Iterable[str]) -> bool:
    for target in targets:
        args = _arguments(target)
        if args is None or leaf in args:
            return True
    return False


def closest(key: str, known: Iterable[str]) -> str | None:
    """The valid key a user most likely meant: the same last part elsewhere (``lr`` -> ``model.lr``), else a
    key of the same level it begins (``gpus`` -> ``gpus_per_node``), holds every word of, or spells nearly
    (``max_step``)."""
    known = sorted(set(known) - {key})
    parent, _, leaf = key.rpartition(".")
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return min(same_leaf, key=len)
    siblings = {k.rsplit(".", 1)[-1]: k for k in known if k.rpartition(".")[0] == parent}
    started = sorted((s for s in siblings if s.startswith(leaf)), key=len)
    if started:
        return siblings[started[0]]
    words = set(leaf.split("_"))  # every word of the key, in a longer name (every_n_steps: every_n_train_steps)
    containing = sorted((s for s in siblings if words <= set(s.split("_"))), key=len)
    if containing:
        return siblings[containing[0]]
    match = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if match:
        return siblings[match[0]]
    ancestors = {key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)}
    match = difflib.get_close_matches(key, [k for k in known if k not in ancestors], n=1, cutoff=0.8)
    return match[0] if match else None


def _error(key: str, known: Iterable[str], node_targets: Iterable[str] = ()) -> ConfigError:
    """The refusal of ``key``, suggesting the closest of ``known`` and of the arguments its node's targets take."""
    parent = key.rpartition(".")[0]
    arguments = {f"{parent}.{a}" for t in node_targets for a in (_arguments(t) or ())} if parent else set()
    guess = closest(key, set(known) | arguments)
    hint = f"; did you mean {guess}?" if guess else ""
    return ConfigError(f"{key} is not a config key (nothing reads it){hint}")


def _known_here(key: str, node_targets: Iterable[str], keys: frozenset[str]) -> bool:
    if key in keys or _free_form(key) or _is_hydra_node_key(key.rsplit(".", 1)[-1]):
        return True
    parent, _, leaf = key.rpartition(".")
    return bool(parent) and _accepted_by_target(parent, leaf, node_targets)


def check_overrides(overrides: Sequence[str], extra_keys: Iterable[str] = ()) -> None:
    """Command-line ``key=value`` overrides (not yet composed): a key no yaml file defines, that no target
    takes, is refused here, so Hydra does not suggest adding it with ``+``. ``extra_keys``: keys the calling
    tool reads itself (``ring-plan``'s ``gpus_per_node``...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    keys, targets = schema()
    extra = set(extra_keys)
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    parser = OverridesParser.create()
    for arg in (a for a in overrides if "=" in a and not a.startswith("-")):
        try:  # an option's value (``--cfg job``) or a malformed override: Hydra reports it
            override = parser.parse_override(arg)
        except HydraException:
            continue
        key = override.key_or_group
        if override.is_delete() or "/" in key or key.split(".")[0] == "hydra" or key in groups or key in extra:
            continue
        parent = key.rpartition(".")[0]
        if not _known_here(key, targets.get(parent, ()), keys) and not _new_entry(key):
            raise _error(key, keys | extra, targets.get(parent, ()))


def _new_entry(key: str) -> bool:
    """``callbacks.mine._target_`` / ``callbacks.mine.arg``: an entry the user adds to a collection."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[0] in ENTRY_COLLECTIONS


def check_config(cfg: DictConfig, extra_keys: Iterable[str] = ()) -> None:
    """Every key of the composed config is read by something; else :class:`ConfigError` naming the key and
    the closest valid one."""
    keys, _ = schema()
    keys = keys | set(extra_keys)

    def walk(node: Any, prefix: str, node_targets: frozenset[str]) -> None:
        for key, value in node.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            if _free_form(full):
                continue
            is_entry = prefix in ENTRY_COLLECTIONS and isinstance(value, dict) and "_target_" in value
            if not (is_entry or _known_here(full, node_targets, keys)):
                raise _error(full, keys, node_targets)
            if isinstance(value, dict):
                walk(value, full, frozenset([value["_target_"]]) if "_target_" in value else frozenset())

    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    walk(container, "", frozenset())
