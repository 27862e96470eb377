"""Suite-wide settings: the ``unit`` marker of the fast inner loop, and the preloaded Python of the subprocesses.

``pytest -m unit`` selects the tests that run in the pytest process itself: no spawned world, no subprocess,
no compilation. It only selects; CI runs the whole suite, ``unit`` tests included, and no marker is left out.
Whole modules are listed here; a test elsewhere that needs no process of its own carries ``@pytest.mark.unit``.
"""

from __future__ import annotations

import pytest

from ring_plugin.testing import preload_modules
from tests import prefork

UNIT_MODULES = {
    "tests/app/test_checkpoint_verification.py",
    "tests/app/test_data_and_checkpoints.py",
    "tests/app/test_packed_data.py",
    "tests/test_api.py",
    "tests/test_document_plans.py",
    "tests/test_hf_pretrained.py",
    "tests/test_lightning_args.py",
    "tests/test_memory_peak.py",
    "tests/test_model_layers.py",
    "tests/test_planner.py",
    "tests/test_planner_hf_memory.py",
    "tests/test_planner_validation.py",
    "tests/test_resume_sampler.py",
    "tests/test_row_sums.py",
    "tests/test_startup_timeout.py",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: runs in the pytest process (no spawned world, no subprocess): "
                                       "`pytest -m unit` is the fast inner loop; CI runs everything")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(config.rootpath) and \
                item.path.relative_to(config.rootpath).as_posix() in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session", autouse=True)
def _prefork_server():
    """Each pytest process starts its preloaded Python at once (it imports while the first tests run);
    commands built with ``prefork.python()`` start in milliseconds instead of seconds."""
    prefork.start()
    # spawned worlds fork from multiprocessing's fork server: these too are imported once there
    preload_modules("lightning.pytorch", "deepspeed", "transformers")
    yield
    prefork.stop()
