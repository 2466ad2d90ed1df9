"""kernels.configs: tuned-table lookup, defaults, overrides, batch-invariant config, static rules."""

import json

import pytest
import torch

from kernels import KernelConfig, select_config
from kernels.configs import batch_invariant_config, check_config, config_file_name
from moe_validate.contract.spec import QuantScheme


def test_round_trip_dict():
    c = KernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    assert KernelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown keys"):
        KernelConfig.from_dict({**c.to_dict(), "BLOCK_Q": 1})


def test_tuned_table_nearest_m_wins(tmp_path):
    table = {"1": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64), "64": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
             "1024": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)}
    name = config_file_name(8, 256, "NVIDIA H100", torch.bfloat16, QuantScheme.FP8_BLOCK128)
    assert name == "E=8,N=256,device_name=NVIDIA_H100,dtype=fp8_block128,block_shape=[128,128].json"
    (tmp_path / name).write_text(json.dumps(table))
    pick = lambda M: select_config(M, 8, 256, 128, 2, torch.bfloat16, "fp8_block128", "NVIDIA H100",
                                   config_dir=str(tmp_path))
    assert pick(2).BLOCK_M == 16
    assert pick(40).BLOCK_M == 32
    assert pick(5000).BLOCK_M == 64
    # another device or dtype: no table, defaults
    other = select_config(40, 8, 256, 128, 2, torch.bfloat16, "none", "NVIDIA H100", config_dir=str(tmp_path))
    assert isinstance(other, KernelConfig)


def test_defaults_respect_scheme_rules():
    for scheme in QuantScheme:
        gs = 32 if scheme is QuantScheme.INT4_W4A16 else None
        for M in (1, 64, 4096):
            c = select_config(M, 8, 256, 512, 2, torch.bfloat16, scheme, group_size=gs)
            check_config(c, scheme, gs)


def test_batch_invariant_config_is_independent_of_m():
    a = batch_invariant_config(torch.bfloat16, QuantScheme.NONE)
    assert a == batch_invariant_config(torch.bfloat16, QuantScheme.NONE)
    assert batch_invariant_config(torch.bfloat16, QuantScheme.FP8_BLOCK128).BLOCK_K <= 128


def test_static_rules():
    with pytest.raises(ValueError, match="BLOCK_K must be >= 32"):
        check_config(KernelConfig(16, 32, 16), QuantScheme.FP8_CHANNEL_TOKEN, on_gpu=True)
    check_config(KernelConfig(16, 32, 16), QuantScheme.FP8_CHANNEL_TOKEN, on_gpu=False)
    with pytest.raises(ValueError, match="must not straddle"):
        check_config(KernelConfig(16, 32, 256), QuantScheme.FP8_BLOCK128, on_gpu=True)
    with pytest.raises(ValueError, match="group size"):
        check_config(KernelConfig(16, 32, 64), QuantScheme.INT4_W4A16, group_size=32, on_gpu=True)
    with pytest.raises(ValueError, match="power of two"):
        check_config(KernelConfig(24, 32, 32), QuantScheme.NONE, on_gpu=False)
    with pytest.raises(ValueError, match=">= 16 on the GPU"):
        check_config(KernelConfig(8, 32, 32), QuantScheme.NONE, on_gpu=True)


def test_shipped_tables_are_valid_and_found():
    """Every JSON table in kernels/configs parses, passes the static rules and is looked up."""
    import glob
    import os

    from kernels.configs import CONFIG_DIR

    paths = glob.glob(os.path.join(CONFIG_DIR, "E=*.json"))  # devices.json beside them is not a table
    assert paths, "no tuned table shipped"
    for path in paths:
        raw = json.loads(open(path).read())
        assert "_provenance" in raw, f"{path} must say how it was measured"
        for m, cfg in raw.items():
            if not m.startswith("_"):
                check_config(KernelConfig.from_dict(cfg), QuantScheme.NONE, on_gpu=True)
    c = select_config(1000, 8, 28672, 4096, 2, torch.bfloat16, "none", "NVIDIA H100 80GB HBM3")
    assert c == KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


# ---------------------------------------------------------------------------------------------
# GEMM2's own tiles (KernelConfig.gemm2): BLOCK_M shared, the rest per GEMM.
# ---------------------------------------------------------------------------------------------
def test_gemm2_tiles_round_trip_and_resolve():
    from kernels.configs import Gemm2Tiles

    c = KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                     gemm2=Gemm2Tiles(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4))
    d = c.to_dict()
    assert d["gemm2"] == dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    assert KernelConfig.from_dict(json.loads(json.dumps(d))) == c
    assert c.for_gemm2() == KernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    plain = KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64)
    assert "gemm2" not in plain.to_dict(), "records of configs without GEMM2 tiles keep their old shape"
    assert plain.for_gemm2() is plain
    with pytest.raises(ValueError, match="config.gemm2 has unknown keys \\['BLOCK_M'\\]"):
        KernelConfig.from_dict({**d, "gemm2": {**d["gemm2"], "BLOCK_M": 64}})
    with pytest.raises(ValueError, match="config.gemm2 must give \\['BLOCK_K'\\]"):
        KernelConfig.from_dict({**d, "gemm2": {"BLOCK_N": 64}})


def test_gemm2_tiles_obey_the_static_rules():
    from kernels.configs import Gemm2Tiles

    bad_k = KernelConfig(16, 64, 64, gemm2=Gemm2Tiles(BLOCK_N=64, BLOCK_K=256))
    with pytest.raises(ValueError, match="config.gemm2.BLOCK_K must divide 128"):
        check_config(bad_k, QuantScheme.FP8_BLOCK128, on_gpu=True)
    check_config(bad_k, QuantScheme.NONE, on_gpu=True)
    with pytest.raises(ValueError, match="config.gemm2.BLOCK_N must be >= 16 on the GPU"):
        check_config(KernelConfig(16, 64, 64, gemm2=Gemm2Tiles(BLOCK_N=8, BLOCK_K=64)), QuantScheme.NONE, on_gpu=True)


def test_tuned_entry_with_gemm2_tiles(tmp_path):
    entry = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, gemm2=dict(BLOCK_N=256, BLOCK_K=64, num_warps=8))
    name = config_file_name(8, 256, "NVIDIA H100", torch.bfloat16, QuantScheme.NONE)
    (tmp_path / name).write_text(json.dumps({"_provenance": "test", "64": entry}))
    c = select_config(64, 8, 256, 128, 2, torch.bfloat16, "none", "NVIDIA H100", config_dir=str(tmp_path))
    assert c.BLOCK_N == 128 and c.for_gemm2().BLOCK_N == 256 and c.for_gemm2().BLOCK_M == 64


# ---------------------------------------------------------------------------------------------
# Device fallback: a GPU without a table of its own borrows the nearest tuned sibling's.
# ---------------------------------------------------------------------------------------------
_SHAPE = dict(E=8, N=256, dtype=torch.bfloat16, scheme=QuantScheme.NONE)


def _write_tables(directory, devices, tables):
    """devices: {name: (capability, sm_count)}; tables: {device name: BLOCK_M of its one entry}."""
    from kernels.configs import DEVICES_FILE, DeviceFacts

    doc = {"_about": "test"}
    doc.update({name: DeviceFacts(name, cap, sms).to_dict() for name, (cap, sms) in devices.items()})
    (directory / DEVICES_FILE).write_text(json.dumps(doc))
    for device, block_m in tables.items():
        name = config_file_name(_SHAPE["E"], _SHAPE["N"], device, _SHAPE["dtype"], _SHAPE["scheme"])
        (directory / name).write_text(json.dumps({"_provenance": "test", "16": dict(BLOCK_M=block_m, BLOCK_N=64,
                                                                                    BLOCK_K=64)}))


def _lookup(directory, device_name=None, facts=None, scheme=QuantScheme.NONE):
    from kernels.configs import lookup_config

    return lookup_config(16, _SHAPE["E"], _SHAPE["N"], 128, 2, _SHAPE["dtype"], scheme, device_name,
                         config_dir=str(directory), device_facts=facts)


def test_own_table_serves_before_any_sibling(tmp_path):
    from kernels.configs import ConfigSource

    _write_tables(tmp_path, {"Fake H100": ((9, 0), 132), "Fake H200": ((9, 0), 132)},
                  {"Fake H100": 16, "Fake H200": 32})
    cfg, source = _lookup(tmp_path, "Fake H200")
    assert cfg.BLOCK_M == 32
    assert source == ConfigSource("tuned", config_file_name(8, 256, "Fake H200", torch.bfloat16, QuantScheme.NONE),
                                  "Fake H200")


def test_sibling_of_the_same_capability_and_nearest_sm_count_serves(tmp_path):
    from kernels.configs import ConfigSource, DeviceFacts

    # Same SM count but another architecture (A-like), a same-architecture part with fewer SMs
    # (PCIe-like, 114) and one with 132: a 132-SM sm_90 part borrows the 132-SM table.
    _write_tables(tmp_path, {"Fake A": ((8, 0), 132), "Fake H PCIe": ((9, 0), 114), "Fake H SXM": ((9, 0), 132)},
                  {"Fake A": 128, "Fake H PCIe": 64, "Fake H SXM": 16})
    cfg, source = _lookup(tmp_path, facts=DeviceFacts("Fake H200", (9, 0), 132))
    assert cfg.BLOCK_M == 16
    assert source == ConfigSource("sibling", config_file_name(8, 256, "Fake H SXM", torch.bfloat16, QuantScheme.NONE),
                                  "Fake H SXM")
    # 120 SMs: 114 is nearer than 132
    cfg, source = _lookup(tmp_path, facts=DeviceFacts("Fake H 120", (9, 0), 120))
    assert (cfg.BLOCK_M, source.kind, source.device) == (64, "sibling", "Fake H PCIe")
    # equally near (123 is 9 from both): the name decides, so the choice never depends on file order
    cfg, source = _lookup(tmp_path, facts=DeviceFacts("Fake H 123", (9, 0), 123))
    assert source.device == "Fake H PCIe"


def test_sibling_without_a_table_for_the_shape_is_passed_over(tmp_path):
    from kernels.configs import DeviceFacts

    _write_tables(tmp_path, {"Fake H SXM": ((9, 0), 132), "Fake H PCIe": ((9, 0), 114)}, {"Fake H PCIe": 64})
    cfg, source = _lookup(tmp_path, facts=DeviceFacts("Fake H200", (9, 0), 132))
    assert (cfg.BLOCK_M, source.kind, source.device) == (64, "sibling", "Fake H PCIe")
    # no sibling has a table for another scheme: the shape default, said so
    cfg, source = _lookup(tmp_path, facts=DeviceFacts("Fake H200", (9, 0), 132), scheme=QuantScheme.FP8_TENSOR_TOKEN)
    assert (source.kind, source.table, source.device) == ("default", None, None)


def test_no_sibling_across_architectures_or_for_unknown_devices(tmp_path):
    from kernels.configs import DeviceFacts, untuned_config

    _write_tables(tmp_path, {"Fake H SXM": ((9, 0), 132)}, {"Fake H SXM": 64})
    cfg, source = _lookup(tmp_path, facts=DeviceFacts("Fake B", (10, 0), 132))
    assert source.kind == "default"
    assert cfg == untuned_config(16, 8, 256, 128, 2, torch.bfloat16, QuantScheme.NONE)
    # a name with no recorded facts (and no GPU of that name here): its architecture is unknown
    assert _lookup(tmp_path, "Some Other GPU")[1].kind == "default"


def test_devices_file_facts_let_a_tuned_device_borrow_for_its_untuned_shapes(tmp_path):
    """A device listed in devices.json (tuned for some shapes) borrows a sibling's table for the
    others by name alone, without a GPU: its facts come from the file."""
    _write_tables(tmp_path, {"Fake H SXM": ((9, 0), 132), "Fake H200": ((9, 0), 132)}, {"Fake H SXM": 64})
    cfg, source = _lookup(tmp_path, "Fake H200")
    assert (cfg.BLOCK_M, source.kind, source.device) == (64, "sibling", "Fake H SXM")


def test_device_facts_and_devices_file_are_checked():
    from kernels.configs import DeviceFacts

    with pytest.raises(ValueError, match="DeviceFacts.capability must be"):
        DeviceFacts("x", (9,), 132)
    with pytest.raises(ValueError, match="DeviceFacts.sm_count must be a positive int"):
        DeviceFacts("x", (9, 0), 0)
    with pytest.raises(TypeError, match="device_facts must be a kernels.configs.DeviceFacts"):
        select_config(16, 8, 256, 128, 2, torch.bfloat16, "none", device_facts={"name": "x"})


def test_malformed_devices_file_names_the_entry(tmp_path):
    from kernels.configs import DEVICES_FILE

    (tmp_path / DEVICES_FILE).write_text(json.dumps({"Fake H": {"capability": [9, 0]}}))
    with pytest.raises(ValueError, match="entry 'Fake H' must be"):
        _lookup(tmp_path, "Fake H")


def test_shipped_devices_file_covers_the_shipped_tables():
    """Every device with a shipped table has its facts recorded (or its tables could never
    serve a sibling), and every recorded device has tables."""
    import glob
    import os
    import re

    from kernels.configs import CONFIG_DIR, tuned_devices

    devices = tuned_devices()
    assert devices["NVIDIA H100 80GB HBM3"].capability == (9, 0)
    table_devices = {re.search(r"device_name=([^,]+),", os.path.basename(p)).group(1)
                     for p in glob.glob(os.path.join(CONFIG_DIR, "E=*.json"))}
    assert table_devices == {name.replace(" ", "_") for name in devices}


def test_resolve_config_says_which_source_served():
    from kernels.configs import ConfigSource
    from kernels.experts import _resolve_config

    given = KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_stages=1)
    assert _resolve_config(given, 4, 8, 256, 128, 2, torch.bfloat16, QuantScheme.NONE, None, False)[1] == \
        ConfigSource("given")
    cfg, source = _resolve_config(None, 4, 8, 256, 128, 2, torch.bfloat16, QuantScheme.NONE, None, True)
    assert source == ConfigSource("batch_invariant") and cfg == batch_invariant_config(torch.bfloat16, QuantScheme.NONE)
    # no GPU here (interpreter): no device name, the shape default
    assert _resolve_config(None, 4, 8, 256, 128, 2, torch.bfloat16, QuantScheme.NONE, None, False)[1].kind == "default"


def test_tune_records_the_device_facts_beside_the_table(tmp_path):
    """tune merges the tuned device's facts into devices.json (other devices' entries kept), so
    its new table can serve siblings at once."""
    from kernels.configs import DEVICES_FILE, DeviceFacts, tuned_devices
    from moe_validate.bench import ModelShape
    from moe_validate.tune import tune

    (tmp_path / DEVICES_FILE).write_text(json.dumps({"Fake H SXM": {"capability": [9, 0], "sm_count": 132}}))
    tiny = ModelShape("tiny", E=8, topk=2, K=128, I=128)
    only = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_stages=1)
    tune(tiny, "none", [16], out_dir=str(tmp_path), device_name="Fake H200", timer=lambda cfg, M: 1.0,
         check=lambda cfg: (True, "ok"), candidates=[only], device_facts=DeviceFacts("Fake H200", (9, 0), 132))
    assert set(tuned_devices(str(tmp_path))) == {"Fake H SXM", "Fake H200"}
    cfg, source = _lookup(tmp_path, facts=DeviceFacts("Fake H200 NVL", (9, 0), 132))
    assert source.kind == "sibling" and cfg == only


# --- vLLM's table layout ------------------------------------------------------------------------
_VLLM_PYTHON = "/work/venv-vllm/bin/python"  # a venv with vLLM installed, when this machine has one
_VLLM_CONFIGS = "/work/venv-vllm/lib/python3.11/site-packages/vllm/model_executor/layers/fused_moe/configs"


def _vllm_entry(block_m):
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8, "num_warps": 4,
            "num_stages": 3}


def test_vllm_file_name_keys_by_i_and_vllm_dtype_tokens():
    from kernels.configs import vllm_config_file_name, vllm_dtype_token

    # Mixtral 8x7B: our N = 2I = 28672, vLLM's N = I = 14336.
    assert vllm_config_file_name(8, 14336, "NVIDIA H100 80GB HBM3", torch.bfloat16, "fp8_tensor_token") == \
        "E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8.json"
    assert vllm_config_file_name(256, 2048, "NVIDIA H200", torch.bfloat16, "fp8_block128") == \
        "E=256,N=2048,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
    assert vllm_config_file_name(8, 14336, "NVIDIA H100", torch.bfloat16, "none") == \
        "E=8,N=14336,device_name=NVIDIA_H100.json"  # bf16/fp16 activations: no dtype token
    assert vllm_config_file_name(8, 14336, "NVIDIA H200 NVL", torch.float16, "none") == \
        "E=8,N=14336,device_name=NVIDIA_H200.json"  # vLLM files the H200 family under one name
    assert {s.value: vllm_dtype_token(torch.bfloat16, s) for s in QuantScheme} == {
        "none": None, "fp8_block128": "fp8_w8a8", "fp8_channel_token": "fp8_w8a8", "fp8_tensor_token": "fp8_w8a8",
        "fp8_tensor_static": "fp8_w8a8", "fp8_tensor_dynamic": "fp8_w8a8", "int8_channel_token": "int8_w8a8",
        "int8_w8a16": "int8_w8a16", "int4_w4a16": "int4_w4a16"}
    assert vllm_dtype_token(torch.float32, "none") == "float32"


def test_lookup_reads_a_vllm_table_with_its_sidecar(tmp_path):
    """A vLLM-format table for the same shape and device serves once I is known; its sidecar's
    GEMM2 tiles apply to their bucket; our own layout wins in the same folder."""
    from kernels.configs import (ConfigSource, Gemm2Tiles, _load_table, lookup_config, vllm_config_file_name,
                                 vllm_sidecar_name)

    name = vllm_config_file_name(8, 128, "NVIDIA H100", torch.bfloat16, "fp8_block128")
    (tmp_path / name).write_text(json.dumps({"triton_version": "3.5.0", "1": _vllm_entry(16),
                                             "256": _vllm_entry(64)}))
    (tmp_path / vllm_sidecar_name(name)).write_text(json.dumps(
        {"_provenance": "test", "gemm2": {"256": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8}}}))

    def look(M, **kw):
        return lookup_config(M, 8, 256, 512, 2, torch.bfloat16, "fp8_block128", "NVIDIA H100",
                             config_dir=str(tmp_path), **kw)

    cfg, source = look(2, intermediate_size=128)
    assert source == ConfigSource("tuned", name, "NVIDIA H100")
    assert cfg == KernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    assert look(300, intermediate_size=128)[0].gemm2 == Gemm2Tiles(BLOCK_N=128, BLOCK_K=64, num_warps=8)
    assert look(2)[1].kind == "default"  # without I the vLLM name cannot be built
    ours = config_file_name(8, 256, "NVIDIA H100", torch.bfloat16, "fp8_block128")
    (tmp_path / ours).write_text(json.dumps({"1": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)}))
    _load_table.cache_clear()  # the lookups above cached "no file" for this name
    assert look(2, intermediate_size=128) == (KernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64),
                                              ConfigSource("tuned", ours, "NVIDIA H100"))


def test_config_folder_environment_variables_come_before_the_package(tmp_path, monkeypatch):
    from kernels.configs import CONFIG_DIR, config_dirs, lookup_config, vllm_config_file_name

    ours, theirs = tmp_path / "ours", tmp_path / "vllm"
    ours.mkdir(), theirs.mkdir()
    monkeypatch.delenv("MOE_VALIDATE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(theirs))
    (theirs / vllm_config_file_name(8, 128, "NVIDIA H100", torch.bfloat16, "none")).write_text(
        json.dumps({"16": _vllm_entry(16)}))
    look = lambda: lookup_config(16, 8, 256, 128, 2, torch.bfloat16, "none", "NVIDIA H100", intermediate_size=128)
    assert look()[0].BLOCK_M == 16 and look()[1].kind == "tuned"
    monkeypatch.setenv("MOE_VALIDATE_CONFIG_DIR", str(ours))
    assert config_dirs() == (str(ours), str(theirs), CONFIG_DIR)
    assert config_dirs(str(tmp_path)) == (str(tmp_path),)  # an explicit folder replaces the search
    (ours / config_file_name(8, 256, "NVIDIA H100", torch.bfloat16, "none")).write_text(
        json.dumps({"16": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)}))
    assert look()[0].BLOCK_M == 64  # the first folder holding a table for the device wins


def test_malformed_vllm_tables_name_the_file_and_key(tmp_path):
    from kernels.configs import _load_vllm_table, from_vllm_entry

    path = tmp_path / "E=8,N=128,device_name=X.json"
    path.write_text(json.dumps({"_provenance": "ours", "16": _vllm_entry(16)}))
    with pytest.raises(ValueError, match=r"E=8,N=128,device_name=X.json: top-level key '_provenance'"):
        _load_vllm_table(str(path))
    with pytest.raises(ValueError, match=r"unknown keys \['BLOCK_M'\]"):
        from_vllm_entry({**_vllm_entry(16), "BLOCK_M": 16})
    with pytest.raises(ValueError, match="must give"):
        from_vllm_entry({"BLOCK_SIZE_M": 16})
    # other platforms' knobs (ROCm) have no counterpart here and are dropped
    assert from_vllm_entry({**_vllm_entry(16), "waves_per_eu": 0, "kpack": 2}).BLOCK_M == 16


def _tune_vllm(tmp_path, device="Fake GPU", **kw):
    from kernels.configs import Gemm2Tiles
    from moe_validate.bench import ModelShape
    from moe_validate.tune import tune

    tiny = ModelShape("tiny", E=8, topk=2, K=128, I=64)  # silu: our N = 128, vLLM's N = I = 64
    split = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_stages=1,
                         gemm2=Gemm2Tiles(BLOCK_N=64, BLOCK_K=16, num_warps=2, num_stages=1))
    result = tune(tiny, "fp8_tensor_token", [1, 64], out_dir=str(tmp_path), device_name=device,
                  timer=lambda cfg, M: 1.0, check=lambda cfg: (True, "ok"), candidates=[split],
                  table_format="vllm", command="moe-validate tune test", **kw)
    return result, split


def test_tune_format_vllm_writes_vllms_layout_and_a_sidecar(tmp_path):
    """The table holds only M entries in vLLM's spelling (and triton_version, which vLLM's loader
    drops); provenance and GEMM2 tiles sit in the sidecar; our lookup reads both back."""
    from pathlib import Path

    from kernels.configs import VLLM_FIELDS, lookup_config, vllm_sidecar_name

    result, split = _tune_vllm(tmp_path)
    path = Path(result["path"])
    assert path.name == "E=8,N=64,device_name=Fake_GPU,dtype=fp8_w8a8.json"
    raw = json.loads(path.read_text())
    assert set(raw) - {"triton_version"} == {"1", "64"}
    assert all(set(entry) == set(VLLM_FIELDS) for k, entry in raw.items() if k != "triton_version")
    assert raw["1"] == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
                        "num_warps": 4, "num_stages": 1}
    sidecar = json.loads((tmp_path / vllm_sidecar_name(path.name)).read_text())
    assert sidecar["_provenance"]["command"] == "moe-validate tune test"
    assert sidecar["gemm2"]["64"] == split.gemm2.__dict__
    cfg, source = lookup_config(64, 8, 128, 128, 2, torch.bfloat16, "fp8_tensor_token", "Fake GPU",
                                config_dir=str(tmp_path), intermediate_size=64)
    assert cfg == split and source.table == path.name


def test_tune_format_vllm_table_loads_through_vllms_own_loader(tmp_path):
    """vLLM's get_moe_configs (its loader, in a venv with vLLM) finds the written file by the name
    it builds itself for (E, I, dtype) and returns our buckets as it would its own tables."""
    import os
    import subprocess

    if not os.path.exists(_VLLM_PYTHON):
        pytest.skip(f"vLLM is not installed here ({_VLLM_PYTHON} missing); the layout is pinned by "
                    "test_tune_format_vllm_writes_vllms_layout_and_a_sidecar")
    _tune_vllm(tmp_path, device="NVIDIA H200")
    # vLLM derives the device name from the current platform (cpu here): pin it to the tuned one.
    probe = ("import json, vllm.model_executor.layers.fused_moe.fused_moe as f\n"
             "f.get_device_name_as_file_name = lambda: 'NVIDIA_H200'\n"
             "print('RESULT', json.dumps(f.get_moe_configs(8, 64, 'fp8_w8a8')))\n")
    env = {**os.environ, "VLLM_TUNED_CONFIG_FOLDER": str(tmp_path), "PYTHONPATH": ""}
    run = subprocess.run([_VLLM_PYTHON, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.split("RESULT ", 1)[1])
    written = json.loads((tmp_path / "E=8,N=64,device_name=NVIDIA_H200,dtype=fp8_w8a8.json").read_text())
    assert got == {k: v for k, v in written.items() if k != "triton_version"}


def test_every_table_vllm_ships_is_read(tmp_path):
    """Our reader takes vLLM's own shipped tables as they are (field names, ROCm knobs, keys); the
    ",backend=..." tables belong to other kernels (other field names) and are never looked up."""
    import glob
    import os

    from kernels.configs import _load_vllm_table

    files = [f for f in glob.glob(os.path.join(_VLLM_CONFIGS, "E=*.json")) if ",backend=" not in f]
    if not files:
        pytest.skip(f"vLLM's shipped tables are not here ({_VLLM_CONFIGS})")
    unread = {}
    for path in files:
        try:
            table = _load_vllm_table(path)
        except ValueError as exc:
            unread[os.path.basename(path)] = str(exc)
            continue
        assert table and all(isinstance(c, KernelConfig) for c in table.values()), path
    assert not unread, f"{len(unread)} of {len(files)} shipped tables unread: {unread}"


def test_fp8_accumulation_follows_the_warpgroup_rule_where_measured():
    # Hopper: a tile a warpgroup owns (M % 64 == 0, num_warps % 4 == 0) takes the fp8 wgmma; one GEMM
    # on it makes the launch FP8_MMA; elsewhere (not measured) nothing is claimed.
    from kernels.configs import Gemm2Tiles, fp8_accumulation
    from moe_validate.contract.profile import Fp8Accumulation

    hopper = (9, 0)
    narrow = KernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    assert fp8_accumulation(narrow, hopper) is Fp8Accumulation.FP32
    assert fp8_accumulation(KernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=8), hopper) is Fp8Accumulation.FP32
    for warps in (4, 8):
        wide = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=warps)
        assert fp8_accumulation(wide, hopper) is Fp8Accumulation.FP8_MMA
    two_warps = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=2)
    assert fp8_accumulation(two_warps, hopper) is Fp8Accumulation.FP32
    gemm2_wide = KernelConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=2, gemm2=Gemm2Tiles(64, 64, num_warps=4))
    assert fp8_accumulation(gemm2_wide, hopper) is Fp8Accumulation.FP8_MMA
    assert fp8_accumulation(narrow, None) is None  # the interpreter, or no GPU
    assert fp8_accumulation(narrow, (10, 0)) is None  # not measured there
    assert fp8_accumulation(narrow, (8, 9)) is None
