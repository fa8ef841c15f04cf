"""Registers and spill stack of the Triton kernels compiled for sm_90, on any machine (no GPU needed).

    python -m bench.kernel_resources

Compiles each kernel ahead of time the way the JIT specialises it at the GPT-2 shape (16-byte aligned
pointers, sizes and strides divisible by 16, unit strides constant) and reads the resource usage of the cubin
with the cuobjdump that ships with triton. A non-zero STACK means register spills: check it before
spending GPU time on a tile configuration. The tests run it too, so a kernel that only the GPU
compiler rejects fails on CPU first. The configurations compile in parallel, one process per core.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastsae.ops import auxk, batch_filter, columns, decode, decoder, encode, filter, loss, scatter

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
HOPPER = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    "dead_ptr": "*u8",
    "tau_ptr": "*fp32",
    "scratch_ptr": "*i32",
    "aux_tau_ptr": "*fp32",
    "val_buf_ptr": "*fp32",
    "idx_buf_ptr": "*i32",
    "aux_val_buf_ptr": "*fp32",
    "aux_idx_buf_ptr": "*i32",
    "positive_ptr": "*i32",
    "flag_ptr": "*i8",
    "count_ptr": "*i32",
    "aux_count_ptr": "*i32",
    "aux_idx_ptr": "*i32",
    "key_buf_ptr": "*i64",
    "key_ptr": "*i64",
    "floor_ptr": "*fp32",
    "hist_ptr": "*i32",
    "state_ptr": "*i32",
    "finite_ptr": "*i32",
    "tied_ptr": "*i32",
    "tied_before_ptr": "*i32",
    "aux_key_buf_ptr": "*i64",
    "pre_ptr": "*bf16",
    "idx_ptr": "*i32",
    "token_ptr": "*i32",
    "feature_ptr": "*i32",
    "offsets_ptr": "*i64",
    "order_ptr": "*i64",
    "weighted_ptr": "*fp32",
    "partial_ptr": "*fp32",
    "out_ptr": "*fp32",
    "coef_sum_ptr": "*fp32",
    "extra_slot_ptr": "*i32",
    "extra_sums_ptr": "*fp32",
    "eps": "fp32",
    "norm_eps": "fp32",
    "beta1": "fp32",
    "beta2": "fp32",
    "one_minus_beta1": "fp32",
    "one_minus_beta2": "fp32",
    "step_ptr": "*fp32",
    "lr_ptr": "*fp32",
    "step_size": "fp32",
    "bias2_sqrt": "fp32",
    "lr": "fp32",
    "log_beta1": "fp32",
    "log_beta2": "fp32",
    "m_ptr": "*fp32",
    "v_ptr": "*fp32",
}


def resources(fn, constexprs: dict, num_warps: int, num_stages: int = 3, descriptors: dict | None = None) -> str:
    """cuobjdump's 'REG:.. STACK:..' line for `fn` compiled with `constexprs` (bf16 tensors) and
    `descriptors` (argument name: TMA block shape of a bf16 tensor)."""
    signature = {name: POINTER_TYPES.get(name, "*bf16" if name.endswith("_ptr") else "i32") for name in fn.arg_names}
    signature.update({name: f"tensordesc<bf16{list(block)}>" for name, block in (descriptors or {}).items()})
    signature.update({name: "constexpr" for name in constexprs})
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name not in constexprs}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
        attrs=aligned,
    )
    return _usage(triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages}))


def _usage(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    return next(line.strip() for line in usage.splitlines() if "REG:" in line)


def queue_compile(
    name: str, fn, constexprs: dict, num_warps: int, num_stages: int = 3, descriptors: dict | None = None
) -> None:
    """Queues `resources(fn, ...)` for `main` to print as 'name: usage'."""
    _queue.append((name, (fn, constexprs, num_warps, num_stages, descriptors)))


_queue: list[tuple[str, tuple]] = []


def _compile(index: int) -> str:
    name, arguments = _queue[index]
    return f"{name}: {resources(*arguments)}"


def main() -> None:
    """Compiles every queued kernel configuration, one process per core (forked: the workers read the
    queue, whose kernels do not pickle), and prints the results in the queue's order."""
    _queue_kernels()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=context) as pool:
        for line in pool.map(_compile, range(len(_queue))):
            print(line, flush=True)


def _row_filter_constexprs(cfg: dict, k: int, k_aux: int) -> dict:
    """The row filter kernel's constexprs for one of `filter.row_filter_configs(k, k_aux, F)`, as
    `filter.row_filter_topk` launches it."""
    return {"HAS_AUX": k_aux > 0, "MAXIMA_GIVEN": cfg.get("GEMM") == "cutlass", "INLINE_PTX": True,
            "N_GROUPS": cfg["N_GROUPS"], "GROUP": cfg["GROUP"],
            "CHUNK_GROUPS": filter.ROW_FILTER_READ // cfg["GROUP"],
            "HOT_GROUPS": filter.ROW_FILTER_REREAD // cfg["GROUP"], "CAP": cfg["CAP"],
            "KEEP": triton.next_power_of_2(k), "AUX_CAP": cfg["AUX_CAP"],
            "AUX_KEEP": triton.next_power_of_2(max(1, k_aux)), "SELECT": cfg["SELECT"]}  # fmt: skip


def _queue_kernels() -> None:
    unit_strides = {"stride_xd": 1, "stride_wf": 1}
    common = {"DOT_DTYPE": tl.bfloat16, "INPUT_PRECISION": "ieee", **unit_strides}
    keep, aux_keep = 32, 512  # GPT-2: k = 32, k_aux = d / 2 = 384
    cfg = encode._sweep_config(keep, aux_keep)
    tile = {name: cfg[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "KEEP", "CAP", "SORT_ROWS")}
    aux = {name: cfg[name] for name in ("AUX_KEEP", "AUX_CAP", "AUX_SORT_ROWS")}
    for has_aux, count_positive, only_flagged in [(False, False, False), (True, False, True), (False, True, False)]:
        constexprs = {**common, **tile, **aux, "HAS_AUX": has_aux, "COUNT_POSITIVE": count_positive,
                      "ONLY_FLAGGED": only_flagged, "FINISH": only_flagged}  # fmt: skip
        name = f"encode_topk {cfg['BLOCK_M']}x{cfg['BLOCK_N']} warps={cfg['num_warps']} aux={has_aux}"
        queue_compile(
            f"{name}{' positive_counts' if count_positive else ''}",
            encode._encode_topk_fwd_kernel,
            constexprs,
            cfg["num_warps"],
            cfg["num_stages"],
        )
    for cfg in filter.filter_configs(keep, 0, 24576, interpret=False)[::3]:  # each tile shape
        tile = {name: cfg[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        blocks = {"xc_desc": (cfg["BLOCK_M"], cfg["BLOCK_K"]), "w_desc": (cfg["BLOCK_K"], cfg["BLOCK_N"])}
        for has_aux, count_positive, flatten in [(False, False, True), (False, False, False), (True, True, True)]:
            constexprs = {"INPUT_PRECISION": "ieee", **tile, "HAS_AUX": has_aux, "COUNT_POSITIVE": count_positive,
                          "INLINE_PTX": True, "N_PROGRAMS": 132, "FLATTEN": flatten}  # fmt: skip
            name = f"filter {cfg['BLOCK_M']}x{cfg['BLOCK_N']} warps={cfg['num_warps']} aux={has_aux}"
            queue_compile(
                f"{name} flatten={flatten}",
                filter._filter_fwd_kernel,
                constexprs,
                cfg["num_warps"],
                cfg["num_stages"],
                blocks,
            )
    for cap in (256, 1024, 4096):
        constexprs = {"FEWER_IF_UNBOUNDED": False, "OR_FLAGS": False, "CAP": cap, "KEEP": keep, "BLOCK_M": 1}
        queue_compile(f"filter_select cap={cap}", filter._select_kernel, constexprs, filter._row_warps(cap))
    # The threshold-first BatchTopK (batch_filter.py) at k = 32 and 64 (256 and 512 buffer slots).
    for k in (32, 64):
        cap = batch_filter.buffer_slots(k, 24576)
        for name, cfg in batch_filter.routes(k, 24576):
            if name == "chunks":
                constexprs = {"INLINE_PTX": True, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
                tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}"
                queue_compile(f"batch_filter_stream {tile}", batch_filter._stream_filter_kernel, constexprs, 4)
        rows = {"CAP": cap, "BLOCK_M": max(1, 1024 // cap)}
        queue_compile(f"batch_filter_sort cap={cap}", batch_filter._sort_kernel, {"CAP": cap, "BLOCK_M": 1}, cap // 128)
        queue_compile(f"batch_filter_high_hist cap={cap}", batch_filter._high_hist_kernel, {**rows, "WINDOW": 256}, 4)
        queue_compile(f"batch_filter_low_hist cap={cap}", batch_filter._low_hist_kernel, rows, 4)
        queue_compile(f"batch_filter_tied cap={cap}", batch_filter._tied_kernel, rows, 4)
        width = batch_filter.codes_width(k, 24576)
        queue_compile(f"batch_filter_codes cap={cap}", batch_filter._codes_kernel, {**rows, "WIDTH": width}, 4)
    for second in (False, True):
        constexprs = {"BINS": batch_filter.BINS, "BLOCK": 8192, "SECOND": second}
        queue_compile(f"batch_filter_cut_bin second={second}", batch_filter._cut_bin_kernel, constexprs, 16)
    row_filter_cases = [(24576, keep, 384), (16384, keep, 0), (24576, 512, 0), (131072, 64, 0), (5000, 8, 16)]
    for n_features, k, k_aux in row_filter_cases:
        for cfg in filter.row_filter_configs(k, k_aux, n_features):
            if not cfg["SELECT"] and (n_features, k, k_aux) != row_filter_cases[0]:
                continue  # the row program less its select (filter_select below): one case of it is enough
            warps = max(cfg["WARPS"], filter._row_warps(max(cfg["CAP"], cfg["AUX_CAP"])))
            queue_compile(
                f"row_filter F={n_features} k={k} k_aux={k_aux} groups={cfg['N_GROUPS']} cap={cfg['CAP']} "
                f"warps={warps}{'' if cfg['SELECT'] else ' select_launch'}",
                filter._row_filter_kernel,
                _row_filter_constexprs(cfg, k, k_aux),
                num_warps=warps,
            )
    given_maxima = set()  # GEMM variants with the same groups launch the same row kernel: compiled once
    for n_features, k in [(24576, 32), (131072, 64)]:  # over the CUTLASS GEMM's maxima
        for cfg in filter.over_group_maxima(k, n_features):
            if cfg["SELECT"] == "warp":
                continue  # a CUDA kernel (csrc/cutlass/group_max_select_kernel.cuh): nvcc reports its resources
            warps = max(cfg["WARPS"], filter._row_warps(cfg["CAP"]))
            name = (
                f"row_filter_given_maxima F={n_features} k={k} group={cfg['GROUP']} cap={cfg['CAP']} warps={warps}"
                f"{'' if cfg['SELECT'] else ' select_launch'}"
            )
            if name not in given_maxima:
                given_maxima.add(name)
                queue_compile(name, filter._row_filter_kernel, _row_filter_constexprs(cfg, k, 0), num_warps=warps)
    for block_g in (512, 1024, 2048):
        constexprs = {"GROUP": 8, "BLOCK_M": 1, "BLOCK_G": block_g}
        queue_compile(
            f"filter_threshold groups={block_g}",
            filter._threshold_kernel,
            constexprs,
            num_warps=filter._row_warps(2 * block_g),
        )
    queue_compile("filter_center", filter._center_kernel, {"BLOCK_M": 16, "BLOCK_D": 256, "stride_xd": 1}, num_warps=4)
    queue_compile("topk_finish", encode._topk_finish_kernel, {"N_SPLIT": 2, "KEEP": keep, "BLOCK_M": 16}, num_warps=4)
    for cfg in encode._RELU_CANDIDATES:
        tile = {name: cfg[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        constexprs = {**common, **tile, "HAS_THRESHOLD": False, "stride_of": 1}
        queue_compile(
            f"encode_relu {cfg['BLOCK_M']}x{cfg['BLOCK_N']} warps={cfg['num_warps']}",
            encode._encode_relu_fwd_kernel,
            constexprs,
            cfg["num_warps"],
            cfg["num_stages"],
        )
    for cfg in decode._DECODE_CANDIDATES:
        constexprs = {"HAS_BIAS": True, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": cfg["BLOCK_D"], "stride_vk": 1,
                      "CODES_TILE": cfg["CODES_TILE"], "CODES_READ": decode.CODES_READ}  # fmt: skip
        queue_compile(
            f"decode_sparse {cfg['BLOCK_M']}x{cfg['BLOCK_D']} codes={cfg['CODES_TILE']} warps={cfg['num_warps']}",
            decode._decode_sparse_fwd_kernel,
            constexprs,
            cfg["num_warps"],
        )
    for cfg in decode._dvals_candidates():
        tile = {name: cfg[name] for name in ("BLOCK_M", "BLOCK_D", "CODES", "CODES_TILE")}
        name = f"decode_sparse_bwd_vals {cfg['BLOCK_M']}x{cfg['BLOCK_D']} codes={cfg['CODES']}/{cfg['CODES_TILE']}"
        # d vals alone, the fired codes' only (`sparse_dvals(fired_only=)`) and the TopK step's coefficients
        # (`sparse_dvals(grad_vals=)`)
        for coef, fired_only in ((False, False), (False, True), (True, False)):
            constexprs = {**tile, "COEF": coef, "FIRED_ONLY": fired_only, "stride_gd": 1, "stride_ik": 1}
            queue_compile(
                f"{name} coef={coef} fired_only={fired_only} warps={cfg['num_warps']}",
                decode._decode_sparse_bwd_vals_kernel,
                constexprs,
                cfg["num_warps"],
            )
    for has_center in (False, True):
        for cfg in scatter._ATOMIC_CANDIDATES:
            tile = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": cfg["BLOCK_D"]}
            queue_compile(
                f"feature_sum_atomic {tile} warps={cfg['num_warps']} center={has_center}",
                scatter._feature_sum_atomic_kernel,
                {"HAS_CENTER": has_center, **tile},
                cfg["num_warps"],
            )
    # The blocked sums: the encoder's (centred, with AuxK's dead-feature sums added and the centring's
    # gradient from its coef sums) and the decoder's.
    for has_center in (True, False):
        for cfg in scatter._BLOCKED_CANDIDATES:
            tile = {"BLOCK_F": cfg["BLOCK_F"], "BLOCK_E": cfg["BLOCK_E"], "BLOCK_D": cfg["BLOCK_D"]}
            constexprs = {"DOT_DTYPE": tl.bfloat16, "INPUT_PRECISION": "ieee", "HAS_CENTER": has_center,
                          "HAS_EXTRA": has_center, "HAS_EXTRA_SUMS": has_center, "WEIGHTED": has_center,
                          **tile, "stride_rd": 1, "stride_xd": 1}  # fmt: skip
            queue_compile(
                f"feature_sum_blocked {tile} warps={cfg['num_warps']} center={has_center}",
                scatter._feature_sum_blocked_kernel,
                constexprs,
                cfg["num_warps"],
                cfg["num_stages"],
            )
    for n in (1024, auxk.MAX_ROW):  # AlphaFold3's and GPT-2's dead-feature lists (the longest row)
        tile = auxk.row_tile(n)
        warps = tile.pop("num_warps")
        for write_codes, shortcut in ((False, False), (True, False), (True, True)):
            constexprs = {"KEY_SHIFT": 16, "WRITE_CODES": write_codes, "SHORTCUT": shortcut, **tile}
            name = f"auxk_row_topk n={n} codes={write_codes} shortcut={shortcut}"
            queue_compile(name, auxk._row_topk_kernel, constexprs, warps)
    for masked, block_m in ((True, columns.MASKED_BLOCK_M), (False, columns.PLAIN_BLOCK_M)):
        constexprs = {"MASKED": masked, "BLOCK_M": block_m, "BLOCK_N": columns.BLOCK_N}
        queue_compile(f"column_sums masked={masked}", columns._column_sums_kernel, constexprs, columns.WARPS)
    tile = {"BLOCK_P": columns.PARTIAL_ROWS, "BLOCK_N": columns.PARTIAL_COLUMNS}
    queue_compile("add_partial_sums", columns._add_partial_sums_kernel, tile, 4)
    for d in (768, 4096):
        block_m, block_d = loss._tile(d)
        tile = {"BLOCK_M": block_m, "BLOCK_D": block_d}
        queue_compile(f"reconstruction_sums d={d}", loss._reconstruction_sums_kernel, tile, 8)
        constexprs = {"X_HAT_GRAD": True, "X_GRAD": True, **tile}
        queue_compile(f"reconstruction_sums_bwd d={d}", loss._reconstruction_sums_bwd_kernel, constexprs, 8)
    # the training losses' three launches and their gradient's one
    constexprs = {"HAS_AUX": True, "BLOCK_M": loss.LOSS_BLOCK_M, "BLOCK_D": loss.LOSS_BLOCK_D}
    queue_compile("training_sums", loss._training_sums_kernel, constexprs, 4)
    constexprs = {"HAS_AUX": True, "BLOCK_P": 512, "BLOCK_D": loss.MERGE_ELEMENTS // 512}  # 264 programs (H200)
    queue_compile("training_merge_means", loss._merge_means_kernel, constexprs, 8)
    constexprs = {"HAS_AUX": True, "BLOCK_PARTIAL": 1024, "BLOCK_BETWEEN": 16}
    queue_compile("training_losses", loss._training_losses_kernel, constexprs, 4)
    block_m, block_d = loss._tile(768)
    flags = ("GRAD_LOSS", "GRAD_MSE", "GRAD_FVU", "GRAD_AUXK", "RECON_GRAD", "X_GRAD", "AUX_GRAD")
    constexprs = {**dict.fromkeys(flags, True), "BLOCK_M": block_m, "BLOCK_D": block_d}
    queue_compile("training_losses_bwd", loss._training_losses_bwd_kernel, constexprs, 8)
    tile = {"BLOCK_D": scatter.WEIGHTED_SUMS_ROWS, "BLOCK_F": scatter.WEIGHTED_SUMS_BLOCK}
    queue_compile("weighted_sums", scatter._weighted_sums_kernel, tile, 4)
    for d in (768, 4096):
        _, cfg = decoder._grid(torch.empty(1, d, device="meta"))
        tile = {"BLOCK_F": cfg["BLOCK_F"], "BLOCK_D": cfg["BLOCK_D"]}
        queue_compile(
            f"decoder_remove_parallel_grad d={d}", decoder._remove_parallel_grad_kernel, tile, cfg["num_warps"]
        )
        queue_compile(f"decoder_normalize_rows d={d}", decoder._normalize_rows_kernel, tile, cfg["num_warps"])
        for on_device in (False, True):  # the bias corrections from the host, or from a count and rate on the device
            constexprs = {**tile, "STEP_ON_DEVICE": on_device, "LR_ON_DEVICE": on_device}
            name = f"decoder_adam d={d} count_and_rate_on_device={on_device}"
            queue_compile(name, decoder._decoder_adam_kernel, constexprs, cfg["num_warps"])
    adam_constexprs = {"STEP_ON_DEVICE": True, "LR_ON_DEVICE": True, "BLOCK": decoder.ADAM_BLOCK}
    queue_compile("adam count_and_rate_on_device=True", decoder._adam_kernel, adam_constexprs, num_warps=4)


if __name__ == "__main__":
    main()
