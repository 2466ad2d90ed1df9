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
