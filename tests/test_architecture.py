"""The one-way imports of docs/ARCHITECTURE.md: kernels and reference depend on the leaf contract
(``moe_validate.contract``) and on nothing else of the harness.

Each check imports in a fresh interpreter: this test session has loaded the harness already.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What an import may load of moe_validate: the (import-free) package itself and the contract.
_HARNESS_MODULES = ("[m for m in sys.modules if m.startswith('moe_validate.') "
                    "and m.split('.')[1] != 'contract']")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("package", ["kernels", "reference", "moe_validate.contract.spec",
                                     "moe_validate.contract.checks", "moe_validate.contract.rules"])
def test_import_loads_no_harness_module(package):
    proc = _run(f"import sys, {package}\n"
                f"harness = {_HARNESS_MODULES}\n"
                "assert not harness, harness\n"
                "heavy = [m for m in ('jinja2', 'matplotlib') if m in sys.modules]\n"
                "assert not heavy, heavy\n")
    assert proc.returncode == 0, proc.stderr


def test_kernels_and_reference_do_not_import_each_other():
    for package, other in (("kernels", "reference"), ("reference", "kernels")):
        proc = _run(f"import sys, {package}\nassert {other!r} not in sys.modules\n")
        assert proc.returncode == 0, f"import {package} loaded {other}: {proc.stderr}"


def test_rules_load_no_torch():
    """The CLI and the pytest plugin ask ``interpreting()`` before they need torch."""
    proc = _run("import sys, moe_validate.contract.rules\nassert 'torch' not in sys.modules\n")
    assert proc.returncode == 0, proc.stderr


def test_contract_package_imports_nothing():
    proc = _run("import sys, moe_validate.contract\n"
                "loaded = [m for m in sys.modules if m.startswith('moe_validate.')]\n"
                "assert loaded == ['moe_validate.contract'], loaded\n")
    assert proc.returncode == 0, proc.stderr
