"""Test-session setup shared by every test directory (kept deliberately small)."""

import os

import pytest

# README: on a machine without a GPU the kernels run through the Triton interpreter. The flag
# must be set before the first `import triton` (kernels/_interp.py decides at import time).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Hypothesis profiles (moe_validate/hypothesis_profiles.py): registered here too, since on the GPU
# image the plugin loads through pytest_plugins below, after its early hook has passed. The default
# is this suite's: "ci" on CPU, "dev" on a GPU; --hypothesis-profile NAME loads another afterwards.
from moe_validate.contract.rules import interpreting  # noqa: E402
from moe_validate.hypothesis_profiles import default_profile, register_hypothesis_profiles  # noqa: E402

if register_hypothesis_profiles():
    import hypothesis

    hypothesis.settings.load_profile(default_profile(on_gpu=not interpreting()))

# pytester drives the moe_validate pytest plugin in tests/moe_validate/test_plugin.py. The plugin
# is named here too, so the suite-as-items run where the package is only on PYTHONPATH (GPU image).
pytest_plugins = ["pytester", "moe_validate.pytest_plugin"]


def pytest_collection_modifyitems(config, items):
    """`slow` tests are opt-in (pyproject: "opt-in with -m slow"): skipped unless -m names them."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: opt-in with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
