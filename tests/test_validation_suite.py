"""The validation suite as pytest items (see moe_validate/pytest_plugin.py).

    pytest tests/test_validation_suite.py                      # default suite: smoke on CPU
    pytest tests/test_validation_suite.py --moe-suite premerge -n 4 --moe-report out/report.html
    pytest tests/test_validation_suite.py -k fp8_block128 -m lora_dual
"""


def test_case(moe_case, moe_run):
    moe_run(moe_case)
