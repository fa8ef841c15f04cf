"""Whether compute-sanitizer's racecheck reports hazards in Gluon's warp specialisation itself, for
reading racecheck's reports on the warp-specialised filter GEMM (fastsae/ops/filter_ws.py):

    compute-sanitizer --tool racecheck python bench/racecheck_gluon.py --structure filter_ws

The kernels below have no shared memory of their own: each partition stores a constant into its own
global slots, so any hazard racecheck reports lies in how `gl.warp_specialize` starts its partitions,
hands them their arguments and sends them the exit state, not in a kernel that uses it. Structures:
- `minimal`: a default partition of 4 warps and one worker of 1 warp;
- `filter_ws`: filter_ws's partitions (default 4 warps, workers of 4 and 1 warps, registers rebalanced
  to 232 / 40 from a launch at 168), so a report here and not in `minimal` comes with that structure;
- `filter_ws_no_maxnreg`: the same partitions without the register rebalancing (no setmaxnreg);
- `filter_ws_mbarriers`: filter_ws's structure with mbarriers allocated and initialised in shared memory
  before `gl.warp_specialize`, as filter_ws does, and not used after;
- `filter_ws_handoff`: the same, and each worker arrives on its mbarrier after its stores, which the
  default partition waits for before its own (partitions ordered through mbarriers, as in filter_ws);
- `filter_ws_group_barrier`: filter_ws's structure with no mbarrier, only the barrier of the default
  warps (`bar.sync 0, 128`) that follows mbarrier initialisation, before `gl.warp_specialize`.

On the H200 (racecheck, CUDA 13.0, triton 3.6.0) the first three drew 0 hazards and both mbarrier
structures 1 (the workers' read of their partition-state byte against the default partition's writes of
it, at the start and at the exit), as filter_ws does. In their SASS (sm_90) each of those writes comes
before a CTA-wide `BAR.SYNC 1` that the workers pass before their read, in program order on both sides;
the mbarrier structures differ from the hazard-free ones only by the mbarrier initialisation and the
default warps' `BAR.SYNC 0, 128` after it. `filter_ws_group_barrier`, that partial barrier alone with no
mbarrier and no shared memory of the kernel's own, also drew the report (the same read against the same
writes): it comes with a barrier of the default warps before `gl.warp_specialize`, which Gluon emits
after any mbarrier initialisation, and not with what a kernel does in its partitions.
"""

import argparse

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier


@gluon.jit
def _store_constant(out_ptr, value, START: gl.constexpr, WARPS: gl.constexpr):
    """out[START : START + 32 * WARPS] = value + START, one element per thread of the partition."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    offsets = START + gl.arange(0, 32 * WARPS, layout=layout)
    gl.store(out_ptr + offsets, gl.full([32 * WARPS], value + START, gl.int32, layout))


@gluon.jit
def _minimal_kernel(out_ptr, value):
    gl.warp_specialize(
        [(_store_constant, (out_ptr, value, 0, 4)), (_store_constant, (out_ptr, value, 128, 1))], [1], [24]
    )


@gluon.jit
def _filter_ws_structure_kernel(out_ptr, value, GROUP_BARRIER: gl.constexpr):
    if GROUP_BARRIER:
        gl.thread_barrier()  # only the default warps run here: it lowers to bar.sync 0, 128
    gl.warp_specialize(
        [
            (_store_constant, (out_ptr, value, 0, 4)),
            (_store_constant, (out_ptr, value, 128, 4)),
            (_store_constant, (out_ptr, value, 256, 1)),
        ],
        [4, 1],
        [232, 40],
    )


@gluon.jit
def _store_then_arrive(out_ptr, value, bars, START: gl.constexpr, WARPS: gl.constexpr, BAR: gl.constexpr):
    _store_constant(out_ptr, value, START, WARPS)
    mbarrier.arrive(bars.index(BAR), count=1)


@gluon.jit
def _wait_then_store(out_ptr, value, bars, HANDOFF: gl.constexpr):
    if HANDOFF:
        mbarrier.wait(bars.index(0), 0)
        mbarrier.wait(bars.index(1), 0)
    _store_constant(out_ptr, value, 0, 4)


@gluon.jit
def _filter_ws_mbarriers_kernel(out_ptr, value, HANDOFF: gl.constexpr):
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(bars.index(i), count=1)
    if HANDOFF:
        gl.warp_specialize(
            [
                (_wait_then_store, (out_ptr, value, bars, HANDOFF)),
                (_store_then_arrive, (out_ptr, value, bars, 128, 4, 0)),
                (_store_then_arrive, (out_ptr, value, bars, 256, 1, 1)),
            ],
            [4, 1],
            [232, 40],
        )
    else:
        gl.warp_specialize(
            [
                (_wait_then_store, (out_ptr, value, bars, HANDOFF)),
                (_store_constant, (out_ptr, value, 128, 4)),
                (_store_constant, (out_ptr, value, 256, 1)),
            ],
            [4, 1],
            [232, 40],
        )


FILTER_WS_PARTITIONS = [(0, 4), (128, 4), (256, 1)]
# structure: (kernel, the partitions' (start, warps), launch options)
STRUCTURES = {
    "minimal": (_minimal_kernel, [(0, 4), (128, 1)], {}),
    "filter_ws": (_filter_ws_structure_kernel, FILTER_WS_PARTITIONS, {"maxnreg": 168, "GROUP_BARRIER": False}),
    "filter_ws_no_maxnreg": (_filter_ws_structure_kernel, FILTER_WS_PARTITIONS, {"GROUP_BARRIER": False}),
    "filter_ws_mbarriers": (_filter_ws_mbarriers_kernel, FILTER_WS_PARTITIONS, {"maxnreg": 168, "HANDOFF": False}),
    "filter_ws_handoff": (_filter_ws_mbarriers_kernel, FILTER_WS_PARTITIONS, {"maxnreg": 168, "HANDOFF": True}),
    "filter_ws_group_barrier": (
        _filter_ws_structure_kernel,
        FILTER_WS_PARTITIONS,
        {"maxnreg": 168, "GROUP_BARRIER": True},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--structure", choices=sorted(STRUCTURES), default="minimal")
    structure = parser.parse_args().structure
    kernel, partitions, launch = STRUCTURES[structure]
    value = 7
    size = sum(32 * warps for _, warps in partitions)
    out = torch.zeros(size, dtype=torch.int32, device="cuda")
    kernel[(1,)](out, value, num_warps=4, **launch)
    expected = torch.cat([torch.full((32 * warps,), value + start, dtype=torch.int32) for start, warps in partitions])
    assert torch.equal(out.cpu(), expected), f"{structure}: the partitions' stores"
    print(f"gluon warp_specialize ({structure}): every partition stored its values")


if __name__ == "__main__":
    main()
