"""Whether compute-sanitizer's racecheck reports hazards in Gluon's warp specialisation itself, for
reading racecheck's reports on the warp-specialised filter GEMM (fastsae/ops/filter_ws.py):

    compute-sanitizer --tool racecheck python bench/racecheck_gluon.py

The kernel below has no shared memory of its own: a default partition (4 warps) and one worker
partition (1 warp), handed a pointer and an integer, each store to their own global slots. Any hazard
racecheck reports here lies in how `gl.warp_specialize` starts its partitions and hands them their
arguments, not in a kernel that uses it.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _default_partition(out_ptr, value):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offsets = gl.arange(0, 128, layout=layout)
    gl.store(out_ptr + offsets, gl.full([128], value, gl.int32, layout))


@gluon.jit
def _worker_partition(out_ptr, value):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    offsets = 128 + gl.arange(0, 32, layout=layout)
    gl.store(out_ptr + offsets, gl.full([32], value + 1, gl.int32, layout))


@gluon.jit
def _warp_specialized_kernel(out_ptr, value):
    gl.warp_specialize(
        [(_default_partition, (out_ptr, value)), (_worker_partition, (out_ptr, value))],
        [1],
        [24],
    )


out = torch.zeros(160, dtype=torch.int32, device="cuda")
_warp_specialized_kernel[(1,)](out, 7, num_warps=4)
expected = torch.tensor([7] * 128 + [8] * 32, dtype=torch.int32, device="cuda")
assert torch.equal(out, expected), "the partitions' stores"
print("gluon warp_specialize: both partitions stored their values")
