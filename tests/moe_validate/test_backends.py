"""Backends: loading by name / module:attr / entry point, the triton backend's contract
(NaN-poisoned buffers, config choice, recorded config), device skips, the reference backend."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_validate import backends
from moe_validate.backends import Backend, ReferenceBackend, TritonBackend, get_backend
from moe_validate.compare import evaluate
from moe_validate.inputs import make_inputs
from moe_validate.matrix import Case
from moe_validate.runner import default_device

HERE = Path(__file__).resolve().parent
# Small enough for the interpreter (one tile per expert), gated, bf16: the smoke suite's shape.
BASE = Case(M=7, N=64, K=64, E=4, topk=2, dtype="bf16", seed=3)


@pytest.fixture(autouse=True)
def _fakes_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


# --- get_backend ----------------------------------------------------------------------------
def test_builtins():
    assert isinstance(get_backend("triton"), TritonBackend)
    assert isinstance(get_backend("reference"), ReferenceBackend)
    # DESIGN.md: the built-ins are the kernels, the reference, the torch._grouped_mm peer, the
    # installed vLLM's TritonExperts (moe_validate/vllm_backend.py) and the ordered calibration
    # backends (moe_validate/ordered.py)
    assert set(backends.builtin_backend_names()) == {"triton", "reference", "torch-grouped", "vllm", "ordered-reversed",
                                                     "ordered-sequential", "ordered-split-k"}
    assert isinstance(get_backend("triton"), Backend)  # satisfies the runtime-checkable protocol


@pytest.mark.parametrize("spec, cls_name", [
    ("fake_backends:Pass", "Pass"),          # a class: instantiated
    ("fake_backends:make_pass", "Pass"),     # a factory function: called
])
def test_module_attr(spec, cls_name):
    backend = get_backend(spec)
    assert type(backend).__name__ == cls_name and backend.last_config is None


def test_module_attr_instance_gets_defaults():
    import fake_backends

    class Bare:  # no name, no last_config
        def run(self, inputs, case=None):
            return inputs.hidden_states

        def supports(self, case):
            return True, ""

    fake_backends.BARE_INSTANCE = Bare()
    try:
        backend = get_backend("fake_backends:BARE_INSTANCE")
        assert backend is fake_backends.BARE_INSTANCE
        assert backend.name == "fake_backends:BARE_INSTANCE"
        # last_config is an optional capability (ReportsConfig): not invented for the backend
        assert not hasattr(backend, "last_config")
    finally:
        del fake_backends.BARE_INSTANCE


@pytest.mark.parametrize("spec, message", [
    ("", "non-empty string"),
    ("cuda-magic", "must be one of triton, reference"),
    ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
    ("fake_backends:Missing", "has no attribute 'Missing'"),
    (":Pass", "must look like 'package.module:attr'"),
])
def test_bad_specs_are_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        get_backend(spec)


def test_object_without_run_is_a_type_error():
    with pytest.raises(TypeError, match="lacks run, supports"):
        get_backend("fake_backends:NOT_A_BACKEND")


def test_entry_point_group(tmp_path, monkeypatch):
    # A real distribution on sys.path whose metadata registers a backend in our group.
    dist = tmp_path / "fake_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{backends.ENTRY_POINT_GROUP}]\nplanted = fake_backends:Wrong\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(get_backend("planted")).__name__ == "Wrong"


# --- triton backend -------------------------------------------------------------------------
def _capture_apply(monkeypatch):
    """Wraps TritonExperts.apply to snapshot the buffers as the kernel receives them."""
    import kernels

    seen = {}
    real_apply = kernels.TritonExperts.apply

    def spy(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
            expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
            apply_router_weight_on_input, lora=None, config=None, batch_invariant=False):
        seen.update(output=output.clone(), ws13=workspace13.clone(), ws2=workspace2.clone(),
                    config=config, batch_invariant=batch_invariant, a1q_scale=a1q_scale)
        return real_apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                          global_num_experts, expert_map, a1q_scale, a2_scale, workspace13, workspace2,
                          expert_tokens_meta, apply_router_weight_on_input, lora=lora, config=config,
                          batch_invariant=batch_invariant)

    monkeypatch.setattr(kernels.TritonExperts, "apply", spy)
    return seen


def test_triton_backend_poisons_buffers_and_passes(monkeypatch):
    seen = _capture_apply(monkeypatch)
    backend = TritonBackend()
    assert backend.supports(BASE) == (True, "")
    inputs = make_inputs(BASE, device=default_device())
    out = backend.run(inputs, BASE)
    for name in ("output", "ws13", "ws2"):
        assert seen[name].dtype == torch.bfloat16 and torch.isnan(seen[name]).all(), f"{name} not NaN-poisoned"
    assert out.shape == (BASE.M, BASE.K) and out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    assert seen["config"] is None and seen["batch_invariant"] is False and seen["a1q_scale"] is None
    assert set(backend.last_config) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    ev = evaluate(BASE, inputs, out)
    assert ev.passed, ev.message()


def test_triton_backend_config_choice(monkeypatch):
    seen = _capture_apply(monkeypatch)
    backend = TritonBackend()
    explicit = replace(BASE, config="BM16BN32BK32GM1W4S2")
    backend.run(make_inputs(explicit, device=default_device()), explicit)
    assert seen["config"].to_dict() == explicit.explicit_config()
    assert backend.last_config == explicit.explicit_config()  # recorded as the kernel reported it

    invariant = replace(BASE, config="inv")
    backend.run(make_inputs(invariant, device=default_device()), invariant)
    assert seen["config"] is None and seen["batch_invariant"] is True


def test_triton_supports_reports_device_reasons(monkeypatch):
    # Without the interpreter and without a GPU there is nothing to run Triton on.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = TritonBackend().supports(BASE)
    assert not ok and "needs a CUDA GPU" in reason
    # On an sm80 GPU, fp8 is refused with the capability in the reason.
    monkeypatch.setattr(backends, "device_capability", lambda: (8, 0))
    ok, reason = TritonBackend().supports(replace(BASE, scheme="fp8_block128"))
    assert not ok and "sm89" in reason


def test_reference_backend_returns_the_storage_dtype_and_passes():
    inputs = make_inputs(BASE, device=default_device())
    out = ReferenceBackend().run(inputs, BASE)
    assert out.dtype == torch.bfloat16 and out.shape == (BASE.M, BASE.K)
    ev = evaluate(BASE, inputs, out)
    assert ev.passed and ev.worst_margin is not None and math.isfinite(ev.worst_margin)


@pytest.mark.parametrize("name", ["ordered-reversed", "ordered-sequential", "ordered-split-k"])
def test_ordered_calibration_backends_pass_and_flip(name):
    """A correct pipeline in another fp32 order: passes the gate (count test included) and differs
    from the mirror in some elements (what calibration measures); refuses quantized schemes."""
    from moe_validate import runner
    from moe_validate.matrix import Case

    backend = backends.get_backend(name)
    assert backend.supports(Case.from_id("bf16-fp8_block128-silu-M7N64K64E4k2-s4"))[0] is False
    records = [runner.run_case_inprocess(Case.from_id(cid), backend, device="cpu").record
               for cid in ("fp16-none-silu-M64N256K256E4k2-s1", "bf16-none-gelu-M64N256K256E4k2-s2")]
    assert [r["outcome"] for r in records] == ["PASS", "PASS"], [r["reason"] for r in records]
    assert sum(r["metrics"]["mirror"]["differing"]["value"] for r in records) > 0
    for r in records:
        assert r["metrics"]["mirror"]["differing"]["value"] <= r["tolerance"]["gate"]["count_allowed"]
