"""Integration-test order: the longest modules first, so that ``pytest -n 2 --dist loadfile``
(scripts/test.sh: a module's tests on one worker) starts the two longest on different workers and
fills in with the short ones. The order follows the measured durations in docs/performance.md
("Test suite"); a module not listed runs last."""

from __future__ import annotations

import pytest

LONGEST_FIRST = ("test_pipeline_e2e", "test_resume", "test_two_node_job", "test_learning_curve",
                 "test_bench_smoke", "test_autoscaling", "test_judge_presets", "test_multi_lora",
                 "test_engine_failures", "test_http_judge")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray cluster per test process, started as ray_align starts it, for the tests that
    call ray_align's functions directly. Tests of the CLI start their own cluster in their own
    process, as users do."""
    import ray

    from ray_align.config import RayConfig
    from ray_align.pipeline import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()
