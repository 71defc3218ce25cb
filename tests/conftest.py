# The tests force 8 CPU devices before JAX is imported, so they pass on any machine.
import os


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "the tests need 8 CPU devices"
    yield


@pytest.fixture
def leaks():
    """Runs the test body under `jax.checking_leaks()`."""
    with jax.checking_leaks():
        yield
