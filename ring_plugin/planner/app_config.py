"""The ``ring-train`` config the planner reads: the app's own config files, composed by Hydra."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(recipe: str | None, overrides: Sequence[str] = ()) -> Any:
    """The ``ring-train`` config for ``recipe`` with Hydra ``overrides`` (no run is started)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    recipes = sorted(path.stem for path in (CONFIG_DIR / "recipe").glob("*.yaml"))
    if recipe is not None and recipe not in recipes:
        raise ValueError(f"recipe={recipe!r} is not a ring-train recipe; valid: {', '.join(recipes)}")
    args = list(overrides) + ([f"recipe={recipe}"] if recipe else [])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=args)
