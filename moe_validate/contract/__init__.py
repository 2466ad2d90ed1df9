"""The contract the kernels, the reference and the harness share: a leaf subpackage.

- ``spec``: the vocabulary of SPEC.md (``Activation``, ``QuantScheme``, ``QuantConfig``,
  ``LoRASpec``, ``MoEInputs``, the format constants).
- ``checks``: the "Bad input" checks both implementations run (``validate_call``).
- ``rules``: the few decisions both sides must make the same way (which fused paths apply to
  a call, whether Triton interprets, when the tiny-M naive path runs).
- ``interpreter``: the patches that make Triton's CPU interpreter compute what a GPU computes,
  for any kernel (``install()``; numpy and triton, imported when it is).

Its modules import torch, numpy, triton, the standard library and each other only, never the
rest of ``moe_validate``, so that ``import kernels`` or ``import reference`` does not load the harness
(``tests/test_architecture.py`` holds it to that). Nothing is imported here, so importing one
module costs only that module.
"""
