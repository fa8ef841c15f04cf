"""The filter GEMM of the threshold-first TopK encode (`filter.py`, step 3), warp-specialised for Hopper in
Gluon: experimental, a tuner candidate only with FASTSAE_FILTER_WS=1 (`filter.WARP_SPECIALIZED`).

On the H200 (bf16, same run as the Triton kernel) its survivors matched the Triton kernel's. With no
survivor its 6-stage ring ran at 1.14x the cuBLAS GEMM at the GPT-2 width (Triton: 1.27x). With the
survivors its best configuration made the encode 2.02x the GEMM at GPT-2 (Triton: 2.15x), level at AF3
(2.95x) and slower at k = 128 and at the Llama-8B width, so it is off by default. compute-sanitizer's
racecheck reports one hazard in its partition dispatch; a Gluon kernel with no logic and no shared
memory of its own draws the same report from the default warps' barrier before `gl.warp_specialize`
alone (bench/racecheck_gluon.py, bench/results/reliability.md), so it is not in this kernel.

Why: the Triton filter kernel's epilogue (bias, compare, survivor appends) runs on the same warps as its
matmul, so no tile's epilogue overlaps any matmul; on the H200 with every threshold at +inf (no
survivor) it took 1.38x / 1.41x the cuBLAS GEMM at the GPT-2 / AlphaFold3 widths, above the encode's
1.25x target before any survivor is kept. Here each persistent program has three partitions:
- a producer warp streams the xc [BLOCK_M, BLOCK_K] and W_enc [BLOCK_K, BLOCK_N] tiles of the program's
  output tiles, in order, through TMA into a ring of NUM_STAGES shared-memory slots (`ready` /
  `empty` mbarriers per slot);
- two consumer warpgroups take the program's tiles in turn (even and odd), each accumulating its tile
  with asynchronous wgmma over the ring and then running the epilogue, so one consumer's epilogue runs
  while the other's tile occupies the tensor cores (cuBLAS's ping-pong schedule). Their mainloops
  alternate in tile order (a `turns` mbarrier per consumer): an mbarrier's parity wait cannot tell
  phase n from n + 2, so a consumer must not wait on a ring slot more than one fill ahead of it (the
  first version let the odd consumer start early, read slots before they were filled and fault).
The epilogue is the Triton kernel's: pre = acc + b_enc, and every entry above its row's threshold
appended to the row's buffer as an int64 (value, feature) key through `filter._append_survivors`' PTX,
in the accumulator's own registers. Same contract as `filter.filter_gemm` without AuxK and positive
counts (those take the Triton kernel), for bf16 / fp16 operands.
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .filter import CLAIM_CONSTRAINTS, CLAIM_PTX, EPILOGUE_PACK, STORE_CONSTRAINTS, STORE_PTX, grouped_tile
from .launch import sm_count

GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
CONSUMER_WARPS = gl.constexpr(4)  # one warpgroup per consumer: its accumulator [BLOCK_M, BLOCK_N] in registers
# Registers per thread after the partitions rebalance (setmaxnreg): two consumer warpgroups at 232 and
# the producer's warpgroup at 40 fill the 65536 of an SM; the launch asks for the even share, 168.
CONSUMER_REGISTERS, PRODUCER_REGISTERS, LAUNCH_REGISTERS = gl.constexpr(232), gl.constexpr(40), 168


@gluon.jit
def _producer(xc_desc, w_desc, ready, empty, a_ring, b_ring, B, D, F,
              GROUP_M: gl.constexpr, N_PROGRAMS: gl.constexpr):  # fmt: skip
    BLOCK_M: gl.constexpr = xc_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = xc_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    NUM_STAGES: gl.constexpr = a_ring.type.shape[0]
    n_tiles = gl.cdiv(B, BLOCK_M) * gl.cdiv(F, BLOCK_N)
    position = 0  # ring slots filled so far: the consumers count them the same way
    for tile in range(gl.program_id(0), n_tiles, N_PROGRAMS):
        row_block, col_block = grouped_tile(tile, B, F, BLOCK_M, BLOCK_N, GROUP_M)
        row_start, col_start = row_block * BLOCK_M, col_block * BLOCK_N
        for d0 in range(0, D, BLOCK_K):
            slot = position % NUM_STAGES
            # A slot's first fill waits on nothing: mbarriers start with phase 1 complete.
            mbarrier.wait(empty.index(slot), ((position // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), xc_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(xc_desc, [row_start, d0], ready.index(slot), a_ring.index(slot))
            tma.async_copy_global_to_shared(w_desc, [d0, col_start], ready.index(slot), b_ring.index(slot))
            position += 1


@gluon.jit
def _consumer(xc_desc, w_desc, ready, empty, turns, a_ring, b_ring, B, D, F,
              b_enc_ptr, tau_ptr, count_ptr, key_buf_ptr, cap,
              PARITY: gl.constexpr, GROUP_M: gl.constexpr, N_PROGRAMS: gl.constexpr):  # fmt: skip
    """The program's tiles whose local index has PARITY: matmul over the ring, then the epilogue."""
    BLOCK_M: gl.constexpr = xc_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = xc_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    NUM_STAGES: gl.constexpr = a_ring.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 256 // xc_desc.dtype.primitive_bitwidth]
    )
    rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
    cols_layout: gl.constexpr = gl.SliceLayout(0, layout)
    n_tiles = gl.cdiv(B, BLOCK_M) * gl.cdiv(F, BLOCK_N)
    k_steps = gl.cdiv(D, BLOCK_K)
    local = 0
    for tile in range(gl.program_id(0), n_tiles, N_PROGRAMS):
        if local % 2 == PARITY:
            row_block, col_block = grouped_tile(tile, B, F, BLOCK_M, BLOCK_N, GROUP_M)
            row_start, col_start = row_block * BLOCK_M, col_block * BLOCK_N
            position = local * k_steps
            # Wait until the other consumer's mainloop of the previous tile is done: its arrival number
            # (local - 1) // 2, written without a negative operand for local = 0 (no wait there).
            mbarrier.wait(turns.index(1 - PARITY), ((local + 1) // 2 - 1) & 1, pred=local > 0)
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout)
            for step in range(k_steps):
                slot = position % NUM_STAGES
                mbarrier.wait(ready.index(slot), (position // NUM_STAGES) & 1)
                acc = warpgroup_mma(a_ring.index(slot), b_ring.index(slot), acc, use_acc=step > 0, is_async=True)
                # One wgmma in flight: the previous step's is done reading its slot, which goes back to the producer.
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_ring.index(slot), b_ring.index(slot)))[0]
                mbarrier.arrive(empty.index((position + NUM_STAGES - 1) % NUM_STAGES), count=1, pred=step > 0)
                position += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index((position + NUM_STAGES - 1) % NUM_STAGES), count=1)
            mbarrier.arrive(turns.index(PARITY), count=1)  # the other consumer's mainloop may start
            _epilogue(acc, row_start, col_start, B, F, b_enc_ptr, tau_ptr, count_ptr, key_buf_ptr, cap,
                      rows_layout, cols_layout)  # fmt: skip
        local += 1


@gluon.jit
def _epilogue(acc, row_start, col_start, B, F, b_enc_ptr, tau_ptr, count_ptr, key_buf_ptr, cap,
              rows_layout: gl.constexpr, cols_layout: gl.constexpr):  # fmt: skip
    """`filter._append_survivors` on this tile, in the accumulator's layout: out-of-range columns get
    pre = -inf and out-of-range rows tau = +inf, so nothing outside the problem passes."""
    BLOCK_M: gl.constexpr = acc.type.shape[0]
    BLOCK_N: gl.constexpr = acc.type.shape[1]
    rows = row_start + gl.arange(0, BLOCK_M, layout=rows_layout)
    cols = col_start + gl.arange(0, BLOCK_N, layout=cols_layout)
    bias = gl.load(b_enc_ptr + cols, mask=cols < F, other=float("-inf")).to(gl.float32)
    pre = acc + gl.expand_dims(bias, 0)
    tau = gl.load(tau_ptr + rows, mask=rows < B, other=float("inf"))
    row_offsets = gl.broadcast(gl.expand_dims((rows - row_start) * cap, 1), pre)[0]
    tile_base = key_buf_ptr + row_start.to(gl.int64) * cap
    value_bits = pre.to(gl.int32, bitcast=True)
    threshold_bits = gl.broadcast(gl.expand_dims(tau, 1), pre)[0].to(gl.int32, bitcast=True)
    row_index = gl.broadcast(gl.expand_dims(rows, 1), pre)[0]
    features = gl.broadcast(gl.expand_dims(cols, 0), pre)[0]
    slot = gl.inline_asm_elementwise(
        CLAIM_PTX, CLAIM_CONSTRAINTS, [count_ptr, row_index, value_bits, threshold_bits],
        dtype=gl.int32, is_pure=False, pack=EPILOGUE_PACK,
    )  # fmt: skip
    gl.inline_asm_elementwise(
        STORE_PTX, STORE_CONSTRAINTS, [tile_base, row_offsets, slot, value_bits, features, cap],
        dtype=gl.int32, is_pure=False, pack=EPILOGUE_PACK,
    )  # fmt: skip


@gluon.jit
def _filter_ws_kernel(
    xc_desc, w_desc, b_enc_ptr, tau_ptr, count_ptr, key_buf_ptr, B, D, F, cap,
    GROUP_M: gl.constexpr, N_PROGRAMS: gl.constexpr, NUM_STAGES: gl.constexpr,
):  # fmt: skip
    a_ring = gl.allocate_shared_memory(xc_desc.dtype, [NUM_STAGES] + xc_desc.block_type.shape, xc_desc.layout)
    b_ring = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    gl.warp_specialize(
        [
            (_consumer, (xc_desc, w_desc, ready, empty, turns, a_ring, b_ring, B, D, F,  # the default partition
                         b_enc_ptr, tau_ptr, count_ptr, key_buf_ptr, cap, 0, GROUP_M, N_PROGRAMS)),
            (_consumer, (xc_desc, w_desc, ready, empty, turns, a_ring, b_ring, B, D, F,
                         b_enc_ptr, tau_ptr, count_ptr, key_buf_ptr, cap, 1, GROUP_M, N_PROGRAMS)),
            (_producer, (xc_desc, w_desc, ready, empty, a_ring, b_ring, B, D, F, GROUP_M, N_PROGRAMS)),
        ],
        [CONSUMER_WARPS, 1],
        [CONSUMER_REGISTERS, PRODUCER_REGISTERS],
    )  # fmt: skip


def filter_gemm_ws(xc: Tensor, W_enc: Tensor, b_enc: Tensor, tau: Tensor, count: Tensor, key_buf: Tensor,
                   cfg: dict) -> None:  # fmt: skip
    """`filter.filter_gemm` (no AuxK, no positive counts; bf16 / fp16) on the warp-specialised kernel,
    with cfg's BLOCK_M x BLOCK_N tiles per consumer, BLOCK_K and num_stages ring slots."""
    B, D = xc.shape
    F = W_enc.shape[1]
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    dtype = GL_DTYPES[W_enc.dtype]
    xc_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], dtype)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_k, block_n], dtype)
    n_programs = sm_count(xc.device)
    _filter_ws_kernel[(n_programs,)](
        TensorDescriptor.from_tensor(xc, [block_m, block_k], xc_layout),
        TensorDescriptor.from_tensor(W_enc, [block_k, block_n], w_layout),
        b_enc.contiguous(), tau, count, key_buf, B, D, F, key_buf.shape[1],
        GROUP_M=cfg["GROUP_M"], N_PROGRAMS=n_programs, NUM_STAGES=cfg["num_stages"],
        num_warps=CONSUMER_WARPS.value, maxnreg=LAUNCH_REGISTERS,
    )  # fmt: skip
