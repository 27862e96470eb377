"""The planner against every committed GPU run in benchmarks/results/planner_manifest.json: step time
within 15 % and peak memory within 10 % (docs/planner.md, 'Validation'). A run it misses is listed
in KNOWN_MISSES with its error and stays visible as an expected failure until the model is fixed."""

from __future__ import annotations

import pytest

from ring_plugin.planner.validate import validate

CHECKS, TARGETS = validate()
# (run, quantity): the 124M training run's peak is under-predicted by 12 % (docs/planner.md says what
# is not modelled); strict, so fixing the model makes this list fail until it is emptied.
KNOWN_MISSES = {("gpu_lightning_2xH200_2026-11-22.json", "peak_memory")}


@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.run}:{c.quantity}" for c in CHECKS])
def test_prediction_within_target(check, request: pytest.FixtureRequest) -> None:  # noqa: ANN001
    if (check.run, check.quantity) in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"known miss: {100 * check.error:+.1f} %"))
    assert abs(check.error) <= TARGETS[check.quantity], f"{100 * check.error:+.1f} %"


def test_manifest_covers_the_training_run_and_the_ring_benchmarks() -> None:
    runs = {c.run.split(" ")[0] for c in CHECKS}
    assert "gpu_lightning_2xH200_2026-11-22.json" in runs
    assert {"bench_ring_2xH200_2026-11-22.json", "bench_ring_2xH200_2026-11-30.json"} <= runs
