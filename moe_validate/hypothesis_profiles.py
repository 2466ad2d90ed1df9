"""The hypothesis profiles of moe-validate's property tests, registered in this one place.

Select one with hypothesis' own option, ``pytest --hypothesis-profile NAME``:

- ``ci``: the CPU default. 25 examples, derandomized (every CI run tries the same examples: a red
  CI is reproducible), no example database.
- ``dev``: the GPU default and for local exploration. 60 random examples, hypothesis' default
  database (``.hypothesis/``), so a failing example is replayed first next time.
- ``gpu-nightly``: a wide random search (250 examples) whose database lives beside the results
  (``$MOE_VALIDATE_HYPOTHESIS_DB``, default ``reports/hypothesis-db``), so a nightly's failing
  examples are kept with its results and replayed by the next night.

The property tests scale from the loaded profile (``max_examples``) instead of fixing their own
counts, so the profile decides. Registration happens when the pytest plugin loads and from
``tests/conftest.py``; loading the default is the test suite's choice, never the plugin's (the plugin
is active in every pytest session of an environment that has moe-validate installed).
"""

from __future__ import annotations

import os

__all__ = ["PROFILES", "register_hypothesis_profiles", "default_profile"]

PROFILES = ("ci", "dev", "gpu-nightly")
DATABASE_ENV = "MOE_VALIDATE_HYPOTHESIS_DB"


def register_hypothesis_profiles() -> bool:
    """Registers the profiles with hypothesis; False (and nothing done) where it is not installed."""
    try:
        from hypothesis import HealthCheck, settings
        from hypothesis.database import DirectoryBasedExampleDatabase
    except ImportError:
        return False
    # Interpreted cases take a fraction of a second each and GPU cases compile first: no deadline.
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **common)
    settings.register_profile("dev", max_examples=60, **common)
    nightly_db = os.environ.get(DATABASE_ENV, os.path.join("reports", "hypothesis-db"))
    settings.register_profile("gpu-nightly", max_examples=250,
                              database=DirectoryBasedExampleDatabase(nightly_db), **common)
    return True


def default_profile(on_gpu: bool) -> str:
    return "dev" if on_gpu else "ci"
