# The tests ask JAX for 8 CPU devices before its backend starts, so they pass on any
# machine. Child processes that the tests start choose their own device count.
import os


os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_num_cpu_devices", 8)
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
