"""Test-wide settings.

Hypothesis: the default profile ("ci", used by `make test` and CI) draws the same examples every run, so a
failure reproduces; `make fuzz` selects the profile "fuzz" (random seeds, FUZZ_EXAMPLES examples per property,
default 1000) through HYPOTHESIS_PROFILE. No profile asserts time (no deadline, no too-slow health check). Every hypothesis test is marked `property` so `make fuzz` runs them
all and nothing else.
"""

import os
import signal

import pytest
from hypothesis import HealthCheck, settings

# A test session started as a background job (`nohup make test &`, `cmd &` in a script) inherits SIGINT ignored,
# and Python then keeps it ignored: the tests of Ctrl-C (which send SIGINT to this process or to a child) would
# see no interrupt. Ctrl-C is made deliverable again; the children started by tests inherit the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# no deadline and no "too slow" health check: both measure the wall clock, which the machine's load moves
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    deadline=None,
    print_blob=True,
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "1000")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items:  # selected with -m gpu: each is skipped, with its reason, where no CUDA device exists
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="gpu test: no CUDA device here"))
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.property)
