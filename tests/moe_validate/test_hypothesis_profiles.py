"""The hypothesis profiles: registered once, selectable with --hypothesis-profile, the suite's default."""

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")

from moe_validate.contract.rules import interpreting  # noqa: E402
from moe_validate.hypothesis_profiles import DATABASE_ENV, default_profile  # noqa: E402


def test_this_session_runs_the_suites_default_profile():
    if any(arg.startswith("--hypothesis-profile") for arg in os.environ.get("PYTEST_ADDOPTS", "").split()):
        pytest.skip("a profile was chosen on the command line (PYTEST_ADDOPTS)")
    expected = default_profile(on_gpu=not interpreting())
    assert hypothesis.settings.get_current_profile_name() == expected
    if expected == "ci":  # the same examples on every CI run, nothing remembered between runs
        assert hypothesis.settings.default.derandomize and hypothesis.settings.default.database is None


@pytest.mark.parametrize("name, max_examples, keeps_database", [("dev", 60, False), ("gpu-nightly", 250, True)])
def test_hypothesis_profile_option_loads_the_profile(pytester, monkeypatch, tmp_path, name, max_examples,
                                                     keeps_database):
    """Through the installed plugin alone: pytester's directory has none of our conftests."""
    database = tmp_path / "nightly-db"
    database.mkdir()
    monkeypatch.setenv(DATABASE_ENV, str(database))
    pytester.makepyfile(test_profile=f"""
        import os
        from hypothesis import settings
        from hypothesis.database import DirectoryBasedExampleDatabase
        def test_loaded():
            assert settings.get_current_profile_name() == {name!r}
            assert settings.default.max_examples == {max_examples}
            database = settings.default.database
            if {keeps_database!r}:  # beside the results, where the nightly keeps them
                assert isinstance(database, DirectoryBasedExampleDatabase)
                assert os.path.samefile(str(database.path), {str(database)!r})
    """)
    result = pytester.runpytest_subprocess("-p", "moe_validate.pytest_plugin", "--hypothesis-profile", name)
    result.assert_outcomes(passed=1)
