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

    paths = glob.glob(os.path.join(CONFIG_DIR, "*.json"))
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
