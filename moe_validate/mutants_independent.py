"""An independent planted-bug set (issue 26): realistic kernel bugs written without the suites.

``moe_validate.mutants.MUTANTS`` (the selftest's catalogue) was written beside the suites it
tests, so a suite tuned on it proves little about bugs nobody planted. This set was written in
one sitting from ``kernels/`` (all of it), ``docs/SPEC.md`` and ``moe_validate/contract/`` only,
plus the ``Hunk``/``Mutant`` dataclasses of ``moe_validate/mutants.py`` for the data format; the
suites (``moe_validate/matrix.py``), the catalogue itself, ``tests/`` and the coverage and bounds
documents were not read before it was committed. Each bug is the kind of one- or two-line
mistake a kernel author makes: an off-by-one in a mask or a bound, a stride or index taken from
the wrong tensor, a rounding skipped or added, a constant truncated, a clamp on the wrong side.
The kill matrix against the suites is in docs/MUTANTS_INDEPENDENT.md.

Same data as the catalogue (``Mutant``: exact-text ``Hunk`` patches of ``kernels/``, every old
snippet occurring exactly once), with two more fields (``IndependentMutant``): ``area`` (which
part of the kernels it plants into) and ``equivalent_reason`` (empty, or why the bug cannot
change any output a correct harness may look at; such a mutant is left out of the kill rate).
``catch`` is the a-priori expectation written with the bug: ``smoke`` for everything the CPU
interpreter runs, ``premerge`` for a GPU-only code path, ``none`` for the argued equivalents. Two
were changed after the measurement, each with a comment and in docs/MUTANTS_INDEPENDENT.md
(``ind_act_gelu_erf_constant_truncated`` argued equivalent, ``ind_shim_fp32_dot_default_precision``
GPU only); nothing else in this file was changed by what the suites showed, except ``case_facts``.

``reaches`` says which cases run the mutated code at all (not which ones expose it), derived
from SPEC.md's pipeline. The predicates read a small set of case facts (``CaseFacts``) through
``case_facts``, so that they depend on SPEC's vocabulary rather than on the case matrix's field
names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

from moe_validate.contract.rules import fused_silu_fp8_group, takes_naive_path
from moe_validate.mutants import Hunk, Mutant

if TYPE_CHECKING:  # importable without torch, like the catalogue
    from moe_validate.matrix import Case

__all__ = ["IndependentMutant", "INDEPENDENT_MUTANTS", "CaseFacts", "case_facts", "independent_mutant_by_name",
           "INDEPENDENT_AREAS"]

INDEPENDENT_AREAS = ("gemm", "align", "moe_sum", "activation", "quantize", "lora", "pipeline", "interpreter_shim")


@dataclass(frozen=True)
class IndependentMutant(Mutant):
    area: str = ""
    # Non-empty: why no output the harness may judge can change (the mutant leaves the denominator).
    equivalent_reason: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.area not in INDEPENDENT_AREAS:
            raise ValueError(f"mutant {self.name}: area must be one of {INDEPENDENT_AREAS}; got {self.area!r}")
        if self.equivalent_reason and self.catch != "none":
            raise ValueError(f"mutant {self.name}: an equivalent mutant has catch='none'")


# ---------------------------------------------------------------------------------------------
# Case facts: SPEC's vocabulary for one case (``case_facts`` maps a matrix Case onto it).
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseFacts:
    scheme: str  # SPEC scheme name ("none", "fp8_block128", ...)
    activation: str
    dtype: str  # storage dtype S: "float32" | "float16" | "bfloat16"
    M: int
    K: int
    I: int  # noqa: E741 -- SPEC's name
    E: int
    topk: int
    bias: bool  # w1_bias or w2_bias given
    lora: bool
    lora_two_slices: bool
    expert_map: bool
    router_on_input: bool  # apply_router_weight_on_input
    clamp: bool  # gemm1_clamp_limit given
    zero_points: bool  # int4 zero points given

    @property
    def gated(self) -> bool:
        return not self.activation.endswith("_no_mul")

    @property
    def naive(self) -> bool:
        """The "auto" assignment's tiny-M path (SPEC step 5)."""
        return takes_naive_path(self.M * self.topk, self.E)

    @property
    def fp8_group_quant(self) -> bool:
        """SPEC step 8's fused silu + fp8_block128 quantizer (fp32 activation straight to codes)."""
        return fused_silu_fp8_group(self.activation, self.scheme, True if self.clamp else None, self.lora)

    @property
    def activation_in_gemm1(self) -> bool:
        """Without LoRA the kernels apply the activation in GEMM1's epilogue (kernels.experts);
        the silu + fp8 group case fuses only at BLOCK_N = 256, so count it as reachable too."""
        return not self.lora

    @property
    def dynamic_act_scale(self) -> bool:
        return self.scheme in ("fp8_block128", "fp8_channel_token", "fp8_tensor_token", "fp8_tensor_dynamic",
                               "int8_channel_token")

    @property
    def quantized_acts(self) -> bool:
        return self.dynamic_act_scale or self.scheme == "fp8_tensor_static"

    @property
    def fp8(self) -> bool:
        return self.scheme.startswith("fp8")


_STORAGE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def case_facts(case: "Case") -> CaseFacts:
    """The SPEC facts of a matrix Case (how ``moe_validate.inputs`` builds its inputs: int4 zero
    points on odd seeds, two w13 LoRA slices for gated activations on even seeds; ``E`` local)."""
    int4 = case.scheme == "int4_w4a16"
    gated = not case.activation.endswith("_no_mul")
    return CaseFacts(
        scheme=case.scheme, activation=case.activation, dtype=_STORAGE[case.dtype], M=case.M, K=case.K,
        I=case.I, E=case.local_experts, topk=case.topk, bias=case.bias, lora=case.lora != "none",
        lora_two_slices=case.lora != "none" and gated and case.seed % 2 == 0,
        expert_map=case.expert_map != "none", router_on_input=case.router_on_input,
        clamp=case.clamp is not None, zero_points=int4 and case.seed % 2 == 1)


def _reach(pred: Callable[[CaseFacts], bool]) -> Callable[["Case"], bool]:
    return lambda case: bool(pred(case_facts(case)))


def _everything(case: "Case") -> bool:
    return True


def _m(name: str, area: str, bug: str, hunks, reach: Optional[Callable[[CaseFacts], bool]], reach_doc: str, *,
       catch: str = "smoke", why: str = "", equivalent_reason: str = "") -> IndependentMutant:
    if equivalent_reason:
        catch, why = "none", why or f"equivalent: {equivalent_reason}"
    return IndependentMutant(
        name=name, bug=bug, hunks=tuple(Hunk(*h) for h in hunks),
        reaches=_everything if reach is None else _reach(reach), reach_doc=reach_doc,
        catch=catch, why=why, area=area, equivalent_reason=equivalent_reason)


_GG, _AL, _MS, _AC, _QU, _LO, _EX, _IN = ("grouped_gemm.py", "align.py", "moe_sum.py", "activation.py",
                                          "quantize.py", "lora.py", "experts.py", "_interp.py")

INDEPENDENT_MUTANTS: Tuple[IndependentMutant, ...] = (
    # --- grouped GEMM: masks, strides, indices ------------------------------------------------------
    _m("ind_gemm_a_load_drops_k_mask", "gemm",
       "the A tile load of a partial K tile is masked by rows only: lanes past K read the next row's "
       "first columns (harmless times the zeroed B lanes, unless that row holds NaN/Inf)",
       [(_GG, "        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)",
         "        a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)")],
       None, "every case (both GEMMs)"),
    _m("ind_gemm_int4_pointer_step_unpacked", "gemm",
       "int4 weights advance the B pointer by BLOCK_K bytes per K tile instead of BLOCK_K // 2 (packing forgotten)",
       [(_GG, "            b_ptrs += (BLOCK_K // 2) * stride_bk", "            b_ptrs += BLOCK_K * stride_bk")],
       lambda f: f.scheme == "int4_w4a16", "int4_w4a16 cases"),
    _m("ind_gemm_int4_nibble_order", "gemm",
       "int4 unpacking takes the high nibble for even k (SPEC: low nibble = even k)",
       [(_GG, "        b_shift = (offs_k[:, None] % 2) * 4", "        b_shift = (1 - offs_k[:, None] % 2) * 4")],
       lambda f: f.scheme == "int4_w4a16", "int4_w4a16 cases"),
    _m("ind_gemm_int4_default_zp_twos_complement", "gemm",
       "without zero points the nibble is read as two's complement (q ^ 8) - 8 instead of q - 8",
       [(_GG, "                q = q - 8", "                q = (q ^ 8) - 8")],
       lambda f: f.scheme == "int4_w4a16" and not f.zero_points, "int4_w4a16 cases without zero points"),
    _m("ind_gemm_int4_scale_group_from_k_tile", "gemm",
       "the int4 group scale is indexed by the K tile number instead of the K group (wrong when g > BLOCK_K)",
       [(_GG, "            b_s = tl.load(b_scale_ptr + expert * stride_bse + offs_n.to(tl.int64) * stride_bsn + group * stride_bsk,",
         "            b_s = tl.load(b_scale_ptr + expert * stride_bse + offs_n.to(tl.int64) * stride_bsn + kt * stride_bsk,")],
       lambda f: f.scheme == "int4_w4a16", "int4_w4a16 cases"),
    _m("ind_gemm_int4_zp_group_from_k_tile", "gemm",
       "the int4 zero point is indexed by the K tile number instead of the K group (wrong when g > BLOCK_K)",
       [(_GG, "zp = tl.load(b_zp_ptr + expert * stride_bze + offs_n.to(tl.int64) * stride_bzn + group * stride_bzk,",
         "zp = tl.load(b_zp_ptr + expert * stride_bze + offs_n.to(tl.int64) * stride_bzn + kt * stride_bzk,")],
       lambda f: f.scheme == "int4_w4a16" and f.zero_points, "int4_w4a16 cases with zero points"),
    _m("ind_gemm_fp8_block_act_scale_from_k_tile", "gemm",
       "fp8_block128: the activation group scale is indexed by the K tile number (BLOCK_K < 128 reads the wrong group)",
       [(_GG, "a_s = tl.load(a_scale_ptr + a_rows * stride_asm + group * stride_ask, mask=row_mask, other=0.0)",
         "a_s = tl.load(a_scale_ptr + a_rows * stride_asm + kt * stride_ask, mask=row_mask, other=0.0)")],
       lambda f: f.scheme == "fp8_block128", "fp8_block128 cases"),
    _m("ind_gemm_fp8_block_weight_block_from_tile", "gemm",
       "fp8_block128, one weight scale per tile: the N block index is the column-tile index pid_n "
       "(right only when BLOCK_N = 128)",
       [(_GG, "((pid_n * BLOCK_N) // GROUP_N).to(tl.int64)", "pid_n.to(tl.int64)")],
       lambda f: f.scheme == "fp8_block128", "fp8_block128 cases (GEMM2, and GEMM1 without a fused gated activation)"),
    _m("ind_gemm_fp8_block_scalar_scale_for_gate_up", "gemm",
       "fp8_block128 with a fused gated activation takes the one-scale-per-tile shortcut, although the "
       "tile's up rows (I + j) lie in another weight scale block than its gate rows",
       [(_GG, '                    if GATE_UP == "none" and GROUP_N % BLOCK_N == 0:',
         "                    if GROUP_N % BLOCK_N == 0:")],
       lambda f: f.scheme == "fp8_block128" and f.gated and f.activation_in_gemm1,
       "fp8_block128 with a gated activation fused into GEMM1 (no LoRA)"),
    _m("ind_gemm_fused_gate_up_swapped", "gemm",
       "fused gated activation (split layout): the gate reads the up rows [I, 2I) and the up the gate rows",
       [(_GG, "            offs_n = offs_pair + is_up * N", "            offs_n = offs_pair + (1 - is_up) * N")],
       lambda f: f.gated and f.activation != "swigluoai" and f.activation_in_gemm1,
       "gated activations other than swigluoai fused into GEMM1 (no LoRA)"),
    _m("ind_gemm_fused_swigluoai_gate_up_swapped", "gemm",
       "fused swigluoai: gate taken from the odd rows and up from the even rows (SPEC: even = gate)",
       [(_GG, "            offs_n = 2 * offs_pair + is_up", "            offs_n = 2 * offs_pair + (1 - is_up)")],
       lambda f: f.activation == "swigluoai" and f.activation_in_gemm1, "swigluoai fused into GEMM1 (no LoRA)"),
    _m("ind_gemm_group_m_partial_group", "gemm",
       "GROUP_M swizzle: the last, partial group of row tiles is taken as GROUP_M wide (tiles skipped or repeated)",
       [(_GG, "    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)", "    group_size_m = GROUP_M")],
       None, "every case (the swizzle runs always; it only matters with GROUP_M > 1)"),
    _m("ind_gemm_fused_gated_column_tiles_not_halved", "gemm",
       "fused gated activation: the column-tile count uses BLOCK_N columns per program instead of BLOCK_N // 2 "
       "(program ids mapped to the wrong tiles)",
       [(_GG, "        num_pid_n = tl.cdiv(N, BLOCK_N // 2)", "        num_pid_n = tl.cdiv(N, BLOCK_N)")],
       lambda f: f.gated and f.activation_in_gemm1, "gated activations fused into GEMM1 (no LoRA)"),
    _m("ind_gemm_accumulator_rounded_per_k_tile", "gemm",
       "unquantized GEMM: the fp32 accumulator is rounded to the storage dtype after every K tile",
       [(_GG, "                acc = _interp.dot(a, b, acc)",
         "                acc = _interp.to_fp32(_interp.to_storage(_interp.dot(a, b, acc), a.dtype))")],
       lambda f: f.scheme == "none", "unquantized cases (bf16/fp16 storage; fp32 storage makes it a no-op)"),
    _m("ind_gemm_fp8_block_scale_product_order", "gemm",
       "fp8_block128: partial * a_s * b_s associated left to right instead of partial * (a_s * b_s)",
       [(_GG, "                        acc += partial * (a_s[:, None] * b_s)",
         "                        acc += partial * a_s[:, None] * b_s")],
       lambda f: f.scheme == "fp8_block128", "fp8_block128 cases",
       equivalent_reason="SPEC.md fixes 'block scales per K tile', not the association of the two scale "
                         "products; both orders are one fp32 rounding apart per K tile, the noise of any "
                         "accumulation order, and vLLM's own kernel multiplies left to right"),
    _m("ind_gemm_bias_after_router_weight", "gemm",
       "GEMM2 epilogue multiplies by the router weight before adding the bias ((acc * w) + b, SPEC: (acc + b) * w)",
       [(_GG,
         "    if HAS_BIAS:\n"
         "        bias = tl.load(bias_ptr + expert * stride_biase + offs_n.to(tl.int64) * stride_biasn, mask=n_mask, other=0.0)\n"
         "        acc = acc + _interp.to_fp32(bias)[None, :]\n"
         "    if MUL_ROUTE_WEIGHT:\n"
         "        w = tl.load(route_weight_ptr + routes, mask=row_mask, other=0.0)\n"
         "        acc = acc * w[:, None]\n",
         "    if MUL_ROUTE_WEIGHT:\n"
         "        w = tl.load(route_weight_ptr + routes, mask=row_mask, other=0.0)\n"
         "        acc = acc * w[:, None]\n"
         "    if HAS_BIAS:\n"
         "        bias = tl.load(bias_ptr + expert * stride_biase + offs_n.to(tl.int64) * stride_biasn, mask=n_mask, other=0.0)\n"
         "        acc = acc + _interp.to_fp32(bias)[None, :]\n")],
       lambda f: f.bias and not f.router_on_input, "cases with a bias and the router weight in GEMM2"),
    _m("ind_gemm_bias_of_expert_zero", "gemm",
       "the bias is loaded without the expert offset: every expert adds expert 0's bias",
       [(_GG, "bias = tl.load(bias_ptr + expert * stride_biase + offs_n", "bias = tl.load(bias_ptr + offs_n")],
       lambda f: f.bias, "cases with a bias"),
    _m("ind_gemm_token_scale_indexed_by_route", "gemm",
       "per-token activation scales are read at the route index instead of the A row (GEMM1 reads x row r // topk)",
       [(_GG, "        a_s = tl.load(a_scale_ptr + a_rows * stride_asm, mask=row_mask, other=0.0)",
         "        a_s = tl.load(a_scale_ptr + routes * stride_asm, mask=row_mask, other=0.0)")],
       lambda f: f.scheme in ("fp8_channel_token", "fp8_tensor_token", "int8_channel_token"),
       "per-token activation scale schemes (visible with topk > 1)"),
    _m("ind_gemm_channel_scale_of_expert_zero", "gemm",
       "per-channel weight scales are read without the expert offset (expert 0's scales for every expert)",
       [(_GG, "        b_s = tl.load(b_scale_ptr + expert * stride_bse + offs_n.to(tl.int64) * stride_bsn, mask=n_mask, other=0.0)",
         "        b_s = tl.load(b_scale_ptr + offs_n.to(tl.int64) * stride_bsn, mask=n_mask, other=0.0)")],
       lambda f: f.scheme in ("fp8_channel_token", "int8_channel_token", "int8_w8a16"), "per-channel weight scale schemes"),
    _m("ind_gemm_tensor_scale_of_expert_zero", "gemm",
       "per-tensor weight scale read as one global scale (expert 0's) instead of per expert",
       [(_GG, "        acc = acc * tl.load(b_scale_ptr + expert * stride_bse)", "        acc = acc * tl.load(b_scale_ptr)")],
       lambda f: f.scheme in ("fp8_tensor_token", "fp8_tensor_static", "fp8_tensor_dynamic"), "per-tensor weight scale schemes"),
    _m("ind_gemm_expert_stride_from_n", "gemm",
       "the expert's weight base is expert * N * stride_bn (contiguous assumed; N is I, half the rows, under a "
       "fused gated activation) instead of expert * stride_be",
       [(_GG, "    b_base = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn",
         "    b_base = b_ptr + expert * N * stride_bn + offs_n[None, :].to(tl.int64) * stride_bn")],
       None, "every case (wrong under a fused gated activation or padded expert strides)"),
    _m("ind_gemm_fused_activation_reads_unrounded_c1", "gemm",
       "fused activation epilogue applies the activation to the fp32 accumulator instead of c1 rounded to S",
       [(_GG, "            c1 = _interp.to_fp32(c)", "            c1 = acc")],
       lambda f: f.activation_in_gemm1, "activations fused into GEMM1 (no LoRA); a no-op at fp32 storage"),
    _m("ind_gemm_fp8_group_max_not_absmax", "gemm",
       "fused silu + fp8 group quantization in GEMM1 takes the group's max instead of its absmax",
       [(_GG, "scale = _dynamic_scale(tl.max(tl.abs(y), axis=1), QUANT_QMAX)",
         "scale = _dynamic_scale(tl.max(y, axis=1), QUANT_QMAX)")],
       lambda f: f.fp8_group_quant, "silu + fp8_block128 without clamp or LoRA (fused only at GEMM1 BLOCK_N = 256)"),
    _m("ind_gemm_topk_sum_skips_c3_rounding", "gemm",
       "fused top-k sum adds each slot's fp32 tile instead of c3 rounded to S (differs from moe_sum's sum of c3)",
       [(_GG, "                total = _interp.add_rn(total, _interp.to_fp32(c))", "                total = _interp.add_rn(total, acc)")],
       lambda f: f.naive and not f.lora, "naive-path cases without LoRA (the fused top-k sum)"),
    _m("ind_gemm_topk_sum_contractible_add", "gemm",
       "fused top-k sum uses a plain add, which the GPU compiler may contract with the epilogue's last product into an FMA",
       [(_GG, "                total = _interp.add_rn(total, _interp.to_fp32(c))",
         "                total = total + _interp.to_fp32(c)")],
       lambda f: f.naive and not f.lora, "naive-path cases without LoRA (the fused top-k sum)",
       catch="premerge",
       why="the interpreter never contracts (add_rn is a plain add there): only a GPU build can differ, "
           "at fp32 storage where the product feeds the add unrounded"),
    # --- routing and alignment --------------------------------------------------------------------
    _m("ind_route_ids_upper_bound_dropped", "align",
       "route_experts checks only ids >= 0 before the expert_map lookup: ids >= global_num_experts index past the map",
       [(_AL, "    valid = in_range & (ids >= 0) & (ids < global_num_experts)", "    valid = in_range & (ids >= 0)")],
       lambda f: f.expert_map, "cases with an expert_map (without one, the local bound still rejects ids >= E)"),
    _m("ind_route_ids_lower_bound_dropped", "align",
       "route_experts checks only ids < global_num_experts before the expert_map lookup: negative ids index before the map",
       [(_AL, "    valid = in_range & (ids >= 0) & (ids < global_num_experts)",
         "    valid = in_range & (ids < global_num_experts)")],
       lambda f: f.expert_map, "cases with an expert_map (without one, local >= 0 still rejects negative ids)"),
    _m("ind_route_topk_ids_strides_ignored", "align",
       "topk_ids are read as contiguous (flat route index) instead of through their strides",
       [(_AL, "    ids = tl.load(topk_ids_ptr + (offs_r // TOP_K) * stride_idm + (offs_r % TOP_K) * stride_idj,",
         "    ids = tl.load(topk_ids_ptr + offs_r,")],
       None, "every case (wrong for a non-contiguous topk_ids)"),
    _m("ind_route_bound_by_local_count", "pipeline",
       "route_experts is given the local expert count as the global one: global ids in [E, G) mapped to local "
       "experts are dropped",
       [(_EX, "        route_expert = route_experts(topk_ids, shape.global_num_experts, E, expert_map, counts=counts)",
         "        route_expert = route_experts(topk_ids, E, E, expert_map, counts=counts)")],
       lambda f: f.expert_map, "cases with an expert_map"),
    _m("ind_align_pad_round_up_off_by_one", "align",
       "padded run length (counts + BLOCK_M) // BLOCK_M * BLOCK_M: a whole extra tile for runs that are multiples "
       "of BLOCK_M, including empty experts (the padded total can outgrow the buffer)",
       [(_AL, "    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M", "    padded = (counts + BLOCK_M) // BLOCK_M * BLOCK_M")],
       lambda f: not f.naive, "aligned-path cases"),
    _m("ind_align_tile_owner_strict", "align",
       "tile owner counts experts with ends < slot instead of <=: an expert's first tile goes to the previous expert",
       [(_AL, "        owner = tl.sum((ends_row[None, :] <= slot[:, None]).to(tl.int32), axis=1)",
         "        owner = tl.sum((ends_row[None, :] < slot[:, None]).to(tl.int32), axis=1)")],
       lambda f: not f.naive, "aligned-path cases"),
    _m("ind_align_scatter_mask_in_range", "align",
       "scatter stores every in-range route, invalid ones too, at whatever slot the masked cursor returned",
       [(_AL, "    tl.store(sorted_route_ids_ptr + slot, offs_r.to(tl.int32), mask=valid)",
         "    tl.store(sorted_route_ids_ptr + slot, offs_r.to(tl.int32), mask=in_range)")],
       lambda f: not f.naive, "aligned-path cases (visible with invalid routes)"),
    _m("ind_align_sentinel_off_by_one", "align",
       "padding slots hold R - 1 (the last route) instead of the sentinel R: padding rows recompute and "
       "overwrite the last route with their tile's expert",
       [(_AL, "    sorted_route_ids = torch.full((padded_len,), R, dtype=torch.int32, device=device)",
         "    sorted_route_ids = torch.full((padded_len,), R - 1, dtype=torch.int32, device=device)")],
       lambda f: not f.naive, "aligned-path cases"),
    _m("ind_align_padding_in_front", "align",
       "each expert's routes are placed at the end of its padded run (padding in front) instead of the start",
       [(_AL, "    starts = ends - padded", "    starts = ends - counts")],
       lambda f: not f.naive, "aligned-path cases",
       equivalent_reason="every tile of the padded run still belongs to its expert and holds only that expert's "
                         "routes or the sentinel; SPEC leaves the order inside a run free, and a row is computed "
                         "from its own route only"),
    # --- moe_sum -------------------------------------------------------------------------------------
    _m("ind_moe_sum_drops_expert_zero", "moe_sum",
       "moe_sum treats route expert 0 as invalid (flag > 0 instead of >= 0)",
       [(_MS, "            slot_valid = t_mask & (flag >= 0)", "            slot_valid = t_mask & (flag > 0)")],
       lambda f: not f.naive or f.lora, "cases that combine through moe_sum (aligned path, or LoRA)"),
    _m("ind_moe_sum_rounds_every_slot", "moe_sum",
       "moe_sum rounds its running sum to S after every slot (no-op for topk <= 2 and fp32)",
       [(_MS, "        acc = tl.where(m, acc + v, acc)",
         "        acc = _interp.to_fp32(_interp.to_storage(tl.where(m, acc + v, acc), out_ptr.dtype.element_ty))")],
       lambda f: (not f.naive or f.lora) and f.topk >= 3, "moe_sum cases with topk >= 3"),
    _m("ind_moe_sum_reversed_slots", "moe_sum",
       "moe_sum adds the slots last to first (SPEC: slot order; fp32 addition is not associative for topk >= 3)",
       [(_MS, "    for j in tl.static_range(TOP_K):\n        flag = tl.load(",
         "    for j_forward in tl.static_range(TOP_K):\n        j = TOP_K - 1 - j_forward\n        flag = tl.load(")],
       lambda f: (not f.naive or f.lora) and f.topk >= 3, "moe_sum cases with topk >= 3"),
    # --- activations ---------------------------------------------------------------------------------
    _m("ind_act_gelu_erf_constant_truncated", "activation",
       "gelu's 1/sqrt(2) truncated to 0.707107 (about 4 fp32 ulps)",
       [(_AC, "tl.math.erf(x * 0.7071067811865476)", "tl.math.erf(x * 0.707107)")],
       lambda f: f.activation in ("gelu", "gelu_no_mul"), "gelu and gelu_no_mul",
       # reclassified after the measurement (docs/MUTANTS_INDEPENDENT.md): written as catch="smoke"
       equivalent_reason="a constant 3e-7 relative off moves gelu's fp32 value by about one ulp, what any "
                         "correct fp32 erf (libdevice's erff: 2 ulp) does too; a gate that caught it would "
                         "fail correct kernels, and SPEC fixes the formula, not the fp32 evaluation of erf"),
    _m("ind_act_gelu_tanh_square_not_cube", "activation",
       "gelu_tanh's inner polynomial uses 0.044715 x^2 instead of x^3",
       [(_AC, "(x + 0.044715 * x * x * x)", "(x + 0.044715 * x * x)")],
       lambda f: f.activation in ("gelu_tanh", "gelu_tanh_no_mul"), "gelu_tanh and gelu_tanh_no_mul"),
    _m("ind_act_swigluoai_up_clamp_one_sided", "activation",
       "swigluoai clamps the up value only from above (SPEC: clamp(u, -7, 7))",
       [(_AC, "        uc = tl.minimum(tl.maximum(u, -SWIGLU_LIMIT), SWIGLU_LIMIT)", "        uc = tl.minimum(u, SWIGLU_LIMIT)")],
       lambda f: f.activation == "swigluoai", "swigluoai"),
    _m("ind_act_swigluoai_gate_clamped_below", "activation",
       "swigluoai also clamps the gate from below at -7 (SPEC: min(x, 7) only)",
       [(_AC, "        xc = tl.minimum(x, SWIGLU_LIMIT)", "        xc = tl.minimum(tl.maximum(x, -SWIGLU_LIMIT), SWIGLU_LIMIT)")],
       lambda f: f.activation == "swigluoai", "swigluoai"),
    _m("ind_act_swiglustep_clamp_before_silu", "activation",
       "swiglustep clamps the gate before the SiLU (silu(min(x, 7))) instead of the SiLU output (min(silu(x), 7))",
       [(_AC, "        y = tl.minimum(_silu(x), SWIGLU_LIMIT) * tl.minimum(tl.maximum(u, -SWIGLU_LIMIT), SWIGLU_LIMIT)",
         "        y = _silu(tl.minimum(x, SWIGLU_LIMIT)) * tl.minimum(tl.maximum(u, -SWIGLU_LIMIT), SWIGLU_LIMIT)")],
       lambda f: f.activation == "swiglustep", "swiglustep"),
    _m("ind_act_silu_exp2_without_log2e", "activation",
       "silu written with exp2(-x) (the log2(e) factor forgotten): x / (1 + 2^-x)",
       [(_AC, "    return x * tl.sigmoid(x)", "    return x / (1.0 + tl.exp2(-x))")],
       lambda f: f.activation in ("silu", "silu_no_mul", "swiglustep") and not f.fp8_group_quant,
       "silu, silu_no_mul, swiglustep (not the fused fp8 group quantizer, which has its own silu)"),
    _m("ind_act_silu_clamp_up_one_sided", "activation",
       "silu with gemm1_clamp_limit clamps the up value only from above (SPEC: clamp(u, -L, L))",
       [(_AC, "            y = _silu(tl.minimum(x, clamp_limit)) * tl.minimum(tl.maximum(u, -clamp_limit), clamp_limit)",
         "            y = _silu(tl.minimum(x, clamp_limit)) * tl.minimum(u, clamp_limit)")],
       lambda f: f.activation == "silu" and f.clamp, "silu with gemm1_clamp_limit"),
    _m("ind_act_relu2_squares_before_relu", "activation",
       "relu2_no_mul returns x^2 (the relu dropped for negative x)",
       [(_AC, "        y = r * r", "        y = x * x")],
       lambda f: f.activation == "relu2_no_mul", "relu2_no_mul"),
    # --- quantizers ----------------------------------------------------------------------------------
    _m("ind_quant_eps_1e6", "quantize",
       "the absmax floor is 1e-6 instead of SPEC's 1e-10 (rows of tiny magnitude get a too-large scale)",
       [(_QU, "_QUANT_EPS = tl.constexpr(QUANT_EPS)", "_QUANT_EPS = tl.constexpr(1e-6)")],
       lambda f: f.dynamic_act_scale, "dynamic activation scale schemes"),
    _m("ind_quant_reciprocal_multiply", "quantize",
       "the quantizer multiplies by the reciprocal of the scale instead of dividing (one fp32 rounding more: "
       "codes move at rounding ties)",
       [(_QU, "        return tl.where(is_zero, x, tl.div_rn(tl.where(is_zero, 1.0, x), d))\n"
              "    else:\n"
              "        return tl.div_rn(x, d)",
         "        return tl.where(is_zero, x, tl.where(is_zero, 1.0, x) * (1.0 / d))\n"
         "    else:\n"
         "        return x * (1.0 / d)")],
       lambda f: f.quantized_acts, "quantized-activation schemes (and the fused silu's division)"),
    _m("ind_quant_tensor_absmax_reads_invalid_rows", "quantize",
       "the per-tensor dynamic absmax reads every row, also rows of invalid routes (unwritten workspace)",
       [(_QU, "    load_rows = _load_row_mask(offs_m, R, row_valid_ptr, HAS_ROW_VALID)\n"
              "    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xr",
         "    load_rows = offs_m < R\n"
         "    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xr")],
       lambda f: f.scheme == "fp8_tensor_dynamic", "fp8_tensor_dynamic (visible with invalid routes)"),
    _m("ind_quant_tensor_absmax_drops_partial_chunk", "quantize",
       "the per-tensor absmax column loop stops at the last full BLOCK_N chunk (a narrower row gets no pass: absmax 0)",
       [(_QU, "    for c0 in range(0, C, BLOCK_N):", "    for c0 in range(0, C - BLOCK_N + 1, BLOCK_N):")],
       lambda f: f.scheme == "fp8_tensor_dynamic", "fp8_tensor_dynamic"),
    _m("ind_quant_group_end_not_clipped", "quantize",
       "per-token-group quantizer: the last group's end is not clipped at C (reads, scales and writes past the row)",
       [(_QU, "    col_end = tl.minimum(col_start + group_cols, C)", "    col_end = col_start + group_cols")],
       lambda f: f.scheme == "fp8_block128", "fp8_block128 (visible when K or I is not a multiple of 128)"),
    _m("ind_quant_int8_truncates", "quantize",
       "int8 codes are truncated toward zero instead of rounded half to even",
       [(_IN, "    x = tl.minimum(tl.maximum(rint(x), -127.0), 127.0)", "    x = tl.minimum(tl.maximum(x, -127.0), 127.0)")],
       lambda f: f.scheme == "int8_channel_token", "int8_channel_token"),
    _m("ind_quant_scale_applied_inverted", "quantize",
       "the per-tensor quantizer (static and dynamic scale) multiplies by the scale instead of dividing by it",
       [(_QU, "    q = _quantize(x.to(tl.float32), scale, QMAX, IS_FP8, SKIP_ZEROS)",
         "    q = _quantize(x.to(tl.float32), 1.0 / scale, QMAX, IS_FP8, SKIP_ZEROS)")],
       lambda f: f.scheme in ("fp8_tensor_static", "fp8_tensor_dynamic"), "per-tensor activation scale schemes"),
    _m("ind_quant_fp8_group_partial_group_unmasked", "quantize",
       "separate silu+fp8 group quantizer: the column mask is dropped from the loads (a partial last group reads "
       "up columns as gate and the next row as up)",
       [(_QU, "    load_mask = load_rows[:, None] & in_cols", "    load_mask = load_rows[:, None]")],
       lambda f: f.fp8_group_quant, "silu + fp8_block128 without clamp or LoRA (visible when I % 128 != 0)"),
    _m("ind_quant_fp8_group_silu_exp2", "quantize",
       "the fused silu+fp8 group formula uses exp2(-gate) (log2(e) forgotten)",
       [(_QU, "    return _div_rn(gate, 1.0 + tl.exp(-gate), SKIP_ZEROS) * up",
         "    return _div_rn(gate, 1.0 + tl.exp2(-gate), SKIP_ZEROS) * up")],
       lambda f: f.fp8_group_quant, "silu + fp8_block128 without clamp or LoRA"),
    _m("ind_quant_saturation_dropped", "quantize",
       "the quantizer no longer clamps x / s to [-QMAX, QMAX] before the cast",
       [(_QU, "    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)\n", "")],
       lambda f: f.quantized_acts, "quantized-activation schemes",
       equivalent_reason="the pipeline always quantizes with QMAX = the format's own maximum (448 / 127), and "
                         "both casts saturate there themselves (to_fp8_e4m3 and to_int8 clamp; the GPU's "
                         "cvt.rn.satfinite too), so only a caller passing qmax=224 (fnuz) could tell"),
    # --- LoRA ----------------------------------------------------------------------------------------
    _m("ind_lora_rank_mask_off_by_one", "lora",
       "LoRA rank mask offs_r <= rank: a non-power-of-two rank reads one row past a and one column past b",
       [(_LO, "        rank_mask = offs_r < rank", "        rank_mask = offs_r <= rank")],
       lambda f: f.lora, "LoRA cases (visible with a rank that is not a power of two)"),
    _m("ind_lora_swigluoai_slices_swapped", "lora",
       "two w13 slices with swigluoai: slice 0 lands on the odd columns and slice 1 on the even ones",
       [(_LO, "            layouts = [lambda t: t[:, 0::2], lambda t: t[:, 1::2]]",
         "            layouts = [lambda t: t[:, 1::2], lambda t: t[:, 0::2]]")],
       lambda f: f.lora and f.lora_two_slices and f.activation == "swigluoai", "LoRA, two w13 slices, swigluoai"),
    _m("ind_lora_single_skips_delta_rounding", "lora",
       "single-stream LoRA adds the fp32 delta to c instead of round_S(delta) (dual stores the rounded delta)",
       [(_LO, "            delta = _round_to_storage(delta, out_ptr.dtype.element_ty)\n"
              "            out_ptrs = out_row_ptr + n * stride_on\n"
              "            if ACCUMULATE:\n"
              "                base = tl.load(out_ptrs, mask=n_mask, other=0.0)\n"
              "                total = _to_fp32(base) + _to_fp32(delta)",
         "            delta_fp32 = delta\n"
         "            delta = _round_to_storage(delta, out_ptr.dtype.element_ty)\n"
         "            out_ptrs = out_row_ptr + n * stride_on\n"
         "            if ACCUMULATE:\n"
         "                base = tl.load(out_ptrs, mask=n_mask, other=0.0)\n"
         "                total = _to_fp32(base) + delta_fp32")],
       lambda f: f.lora, "LoRA cases (single stream; a no-op at fp32 storage)"),
    _m("ind_lora_w2_reads_token_row", "lora",
       "the w2 LoRA shrink reads c2 at the token row (route // topk) instead of the route row",
       [(_LO, "            inp_row_ptr = inp_ptr + route * stride_im", "            inp_row_ptr = inp_ptr + (route // TOP_K) * stride_im")],
       lambda f: f.lora, "LoRA cases (visible with topk > 1)"),
    _m("ind_lora_disabled_adapters_applied", "lora",
       "the enabled flags are ignored: disabled adapters still add their delta",
       [(_LO, "    return active & (enabled != 0), expert, adapter", "    return active, expert, adapter")],
       lambda f: f.lora, "LoRA cases (visible with a disabled adapter in use)"),
    _m("ind_lora_w2_router_weight_dropped", "pipeline",
       "the w2 LoRA delta is not multiplied by the router weight (None passed instead of the route weights)",
       [(_EX, "            apply_lora_w2(c3, c2, route_expert, route_weight, lora, topk=topk, base_gemm=gemm2)",
         "            apply_lora_w2(c3, c2, route_expert, None, lora, topk=topk, base_gemm=gemm2)")],
       lambda f: f.lora and not f.router_on_input, "LoRA cases with the router weight in GEMM2"),
    _m("ind_lora_reads_unweighted_input", "pipeline",
       "with the router weight on the input, the w13 LoRA delta reads hidden_states instead of round_S(x * w)",
       [(_EX, "            apply_lora_w13(c1, x, route_expert, lora, shape.activation, topk=topk, base_gemm=gemm1)",
         "            apply_lora_w13(c1, hidden_states, route_expert, lora, shape.activation, topk=topk, base_gemm=gemm1)")],
       lambda f: f.lora and f.router_on_input, "LoRA with apply_router_weight_on_input"),
    # --- the pipeline --------------------------------------------------------------------------------
    _m("ind_router_weight_applied_twice", "pipeline",
       "with apply_router_weight_on_input, GEMM2 still multiplies by the router weight",
       [(_EX, "        route_weight = None if apply_router_weight_on_input else topk_weights.reshape(-1).contiguous()",
         "        route_weight = topk_weights.reshape(-1).contiguous()")],
       lambda f: f.router_on_input, "apply_router_weight_on_input cases"),
    _m("ind_router_weight_on_input_in_storage_dtype", "pipeline",
       "the router weight on the input is rounded to S and multiplied in S (SPEC: round_S(x * w) in fp32)",
       [(_EX, "            x = (x.float() * topk_weights[:, :1].float()).to(S)", "            x = x * topk_weights[:, :1].to(S)")],
       lambda f: f.router_on_input, "apply_router_weight_on_input cases (a no-op at fp32 storage)"),
    _m("ind_a2_static_scale_from_a1", "pipeline",
       "fp8_tensor_static: GEMM2's input is quantized with a1_scale instead of a2_scale",
       [(_EX, "                a2, a2_used_scale = quantize_activation(c2, scheme, static_scale=quant.a2_scale,",
         "                a2, a2_used_scale = quantize_activation(c2, scheme, static_scale=quant.a1_scale,")],
       lambda f: f.scheme == "fp8_tensor_static", "fp8_tensor_static (visible when a1_scale != a2_scale)"),
    _m("ind_fp8_group_path_ignores_clamp", "pipeline",
       "the fused silu + fp8 group path is chosen without looking at gemm1_clamp_limit (the clamp is lost, or "
       "the fused GEMM refuses the call)",
       [(_EX, "        fused_silu_quant = fused_silu_fp8_group(shape.activation, scheme, clamp, lora is not None)",
         "        fused_silu_quant = fused_silu_fp8_group(shape.activation, scheme, None, lora is not None)")],
       lambda f: f.scheme == "fp8_block128" and f.activation == "silu" and f.clamp,
       "fp8_block128 + silu with gemm1_clamp_limit"),
    # --- the interpreter shim (what the CPU suites run) ------------------------------------------------
    _m("ind_shim_fp8_grid_two_mantissa_bits", "interpreter_shim",
       "the interpreter's fp8 rounding uses a 2-bit mantissa grid (e5m2's step) instead of e4m3's 3 bits",
       [(_IN, "        step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)",
         "        step = ((exp - 2 + 127) << 23).to(tl.float32, bitcast=True)")],
       lambda f: f.fp8, "fp8 schemes under the interpreter"),
    _m("ind_shim_fp32_dot_default_precision", "interpreter_shim",
       "fp32 dots use Triton's default input precision (TF32 on sm_80+) instead of IEEE",
       [(_IN, '        return tl.dot(a, b, acc, input_precision="ieee")', "        return tl.dot(a, b, acc)")],
       lambda f: f.dtype == "float32", "fp32 storage cases",
       # reclassified after the measurement: written as catch="smoke"
       catch="premerge",
       why="the interpreter computes fp32 dots in IEEE whatever input_precision says (unless "
           "MOE_VALIDATE_INTERPRET_FP32_DOT=tf32 asks it to emulate TF32), so only a GPU fp32 case sees TF32"),
)


_BY_NAME: Dict[str, IndependentMutant] = {m.name: m for m in INDEPENDENT_MUTANTS}
assert len(_BY_NAME) == len(INDEPENDENT_MUTANTS), "independent mutant names must be unique"


def independent_mutant_by_name(name: str) -> IndependentMutant:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"no independent mutant named {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None
