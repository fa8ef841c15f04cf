"""The row filter's kernels over CUTLASS's group maxima at one shape, each run once between
cudaProfilerStart and cudaProfilerStop after a warm-up, for Nsight Compute's counters of each kernel:

    ncu --profile-from-start off --set full --import-source yes -o encode python -m bench.ncu_encode --shape af3
    ncu --import encode.ncu-rep --page details                     (throughput, occupancy, stalls)
    ncu --import encode.ncu-rep --page source --csv --print-source sass --kernel-name regex:select_topk
                                                                   (executed instructions by SASS line,
                                                                    summed by bench/ncu_sass.py)

In the profiled range: centring, the CUTLASS GEMM with group maxima (the tile the tuner takes for the
encode at that shape, else the first routed one), the warp select over its output and cuBLAS's GEMM of
the same product for comparison. The select's codes are checked against the reference on the first rows
before the range starts. With --filter-gemm, the threshold-first filter GEMMs instead (bench_gemm's
gemm_filter providers: each CUTLASS variant and the Triton GEMM, on the filter route's thresholds at the
shape's k, their buffers checked as bench_gemm checks them), beside cuBLAS's GEMM: where the appends'
time goes. Needs a CUDA device and fastsae's CUTLASS extension.
"""

from __future__ import annotations

import argparse

import torch

from fastsae.ops import cutlass_gemm, encode, filter, launch
from fastsae.testing import assert_topk_matches

from .bench_encode import CHECK_ROWS, _weights
from .bench_gemm import FILTER_CAP, _check_filter, _filters
from .harness import shape_dims


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="af3", help="of bench/harness.py SHAPES, or d<d>_F<F>_B<B>_k<k>")
    parser.add_argument("--filter-gemm", action="store_true", help="the CUTLASS filter GEMM instead (docstring)")
    args = parser.parse_args(argv)
    if not cutlass_gemm.available():
        raise SystemExit("ncu_encode: fastsae's CUTLASS extension is not built (the `cutlass` extra)")
    d, n_features, n_rows, k = shape_dims(args.shape)
    torch.manual_seed(0)
    x = torch.randn(n_rows, d, device="cuda").bfloat16()
    W_enc, b_enc, b_dec = _weights(d, n_features)
    if args.filter_gemm:
        kernels, names = _filter_gemm_kernels(x, W_enc, b_enc, b_dec, k)
        _profile(kernels)
        print(f"ncu_encode {args.shape}: filter GEMMs {', '.join(names)}, cuBLAS")
        return 0
    configs = [c for c in filter.group_max_configs(k, 0, n_features) if c["SELECT"] == "warp"]
    if not configs:
        raise SystemExit(f"ncu_encode: the warp select takes no configuration at {args.shape}")
    # The GEMM the tuner takes for the encode at this shape where it takes the row filter over CUTLASS's
    # maxima (the first routed one otherwise): its counters are the ones the encode's time is made of.
    encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None)  # tunes the route
    tuned = launch.tuned_choices("encode_topk", d, n_features, launch.bucket(n_rows), k)
    tuned_variants = [cfg["VARIANT"] for name, cfg in tuned if name == "row_filter" and cfg.get("GEMM") == "cutlass"]
    variant = tuned_variants[0] if tuned_variants else configs[0]["VARIANT"]
    group = cutlass_gemm.VARIANTS[variant].group
    xc = filter.center(x, b_dec, W_enc.dtype)
    vals = torch.empty(n_rows, k, dtype=W_enc.dtype, device="cuda")
    idx = torch.empty(n_rows, k, dtype=torch.int32, device="cuda")
    flags = torch.empty(n_rows, dtype=torch.int8, device="cuda")

    def kernels(check: bool) -> None:
        _, pre, maxima = next(filter.group_max_chunks(x, W_enc, b_enc, b_dec, n_rows, None, variant))
        cutlass_gemm.select_topk_group_max(pre, maxima, group, k, vals, idx, flags, cutlass_gemm.SELECT_RAISE_BY_COUNT)
        if check:  # the warm-up
            assert not flags.any(), "the warp select flagged rows"
            assert_topk_matches(vals[:CHECK_ROWS], idx[:CHECK_ROWS], pre[:CHECK_ROWS], k, 2e-2, "warp select")
        torch.mm(xc, W_enc)

    _profile(kernels)
    print(f"ncu_encode {args.shape}: {cutlass_gemm.VARIANTS[variant].name}, group {group}, warp select, cuBLAS")
    return 0


def _profile(kernels) -> None:
    """`kernels(check=True)` as the warm-up, then `kernels(check=False)` alone in the profiled range."""
    kernels(check=True)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    kernels(check=False)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _filter_gemm_kernels(x, W_enc, b_enc, b_dec, k):
    """The kernels of --filter-gemm (bench_gemm's gemm_filter providers on the filter route's thresholds,
    then cuBLAS's GEMM), and the providers' names."""
    xc = filter.center(x, b_dec, W_enc.dtype)
    tau = filter.thresholds(xc, W_enc, b_enc, k, FILTER_CAP)
    providers = _filters(xc, W_enc, b_enc, tau, "")

    def kernels(check: bool) -> None:
        for name, run in providers.items():
            count, key_buf = run()
            if check:  # the warm-up
                _check_filter(count, key_buf, xc, W_enc, b_enc, tau, f"ncu_encode {name}")
        torch.mm(xc, W_enc)

    return kernels, list(providers)


if __name__ == "__main__":
    raise SystemExit(main())
