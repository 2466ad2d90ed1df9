"""Planted backends for the real-run report tests, loaded as ``planted_backends:<Name>``.

Importable by name (not a test module) so that the runner's spawned worker processes load them;
test_real_runs.py puts this directory on ``sys.path``. The general fakes (Wrong, Raise, ...) live
in tests/moe_validate/fake_backends.py; this one adds the failure the page must draw specially.
"""

from moe_validate.backends import ReferenceBackend

# Where NaNAt plants its NaN: (token, column) of the [M, K] output.
NAN_AT = (1, 3)


class NaNAt:
    """The reference's answer with one NaN at ``NAN_AT``: the gate must FAIL on the non-finite
    element, and the report must draw that element's tile as non-finite (magenta)."""

    name = "planted-nan"
    last_config = None

    def supports(self, case):
        return True, ""

    def run(self, inputs, case=None):
        out = ReferenceBackend().run(inputs, case).clone()
        out[NAN_AT] = float("nan")
        return out
