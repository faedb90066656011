"""Shared test fixtures.

One Ray runtime serves the whole session: starting Ray costs seconds, and Ray Data plans
are what we test, not Ray itself. The logical GPU makes Ray plan as it would on a GPU
cluster (decode on CPU tasks, annotation on GPU actors) without a real device.
"""
import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            num_gpus=1,
            object_store_memory=256 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}},
        )
    yield ray
    ray.shutdown()
