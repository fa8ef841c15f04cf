"""A short run of every Triton kernel, for compute-sanitizer (memcheck, racecheck, initcheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m bench.sanitize_kernels

Each shape runs the TopK encode through every route the tuner may pick (the threshold-first filter in
each configuration, with its flagged-row fallback forced, the row filter, the sweep, the dense route),
AuxK and the positive counts, its backward (both per-feature-sums routes and the deterministic mode),
the routes over the experimental CUTLASS GEMM where its extension is built (the row filter over its
group maxima, with the Triton row kernel and with the CUDA warp select, in every tile variant the tuner
may take), the ReLU and JumpReLU encode, the sparse decode and its backward (d vals, the fired codes' only and the
TopK step's coefficients in every tile), the threshold-first BatchTopK codes through each filter route, the
decoder-constraint kernels, SAEAdam's decoder step, the reconstruction sums of the loss and their
backward, the dense AuxK path's row top-k (indices and codes) and its backward's masked column sums;
every result is checked against
the reference, so a kernel that reads or writes out of bounds and happens to survive still fails.
Without the caching allocator (the variable above) memcheck sees each tensor's own bounds.
`--only cutlass` runs the CUTLASS routes alone. `--filter-configs first` runs one configuration of the
filter GEMM instead of all:
the configurations differ only in tile sizes and capacities, and racecheck and initcheck at `large`
take too long for all of them.
"""

from __future__ import annotations

import argparse
import os

os.environ["FASTSAE_AUTOTUNE"] = "0"  # every route is run explicitly; no timing runs under the sanitizer

import torch  # noqa: E402
import triton  # noqa: E402

from fastsae import reference  # noqa: E402
from fastsae.ops import (  # noqa: E402
    auxk,
    batch_filter,
    columns,
    cutlass_gemm,
    decode,
    decoder,
    encode,
    filter,
    loss,
    scatter,
)
from fastsae.testing import (  # noqa: E402
    assert_batchtopk_matches,
    assert_close,
    assert_positive_counts_match,
    assert_topk_matches,
)

# name: (B, d, F, k, k_aux): tiny, odd sizes everywhere, the GPT-2 width with few rows, and the GPT-2 width.
# `wide` runs every kernel configuration `large` does (they depend on F and k, not on B or d) at a small
# fraction of its cuBLAS work: racecheck instruments cuBLAS's GEMMs at about a minute per launch at
# `large`, and leaving cuBLAS out (--kernel-name-exclude) makes this sanitizer fail ("Internal Sanitizer
# Error") on the H200, so racecheck and initcheck run at `wide`, and memcheck at `large` too.
SHAPES = {
    "small": (5, 24, 100, 3, 4),
    "odd": (37, 100, 4099, 17, 33),
    "wide": (64, 128, 24576, 32, 384),
    "large": (1024, 768, 24576, 32, 384),
}
TOLERANCE = 2e-2  # bf16
ROUNDING_BAND = 0.1  # |pre-activation| within which bf16 rounding may flip its sign (the positive counts)


def _problem(B: int, d: int, n_features: int):
    W_dec = reference.normalize_decoder_rows(torch.randn(n_features, d, device="cuda"))
    W_enc = W_dec.T.contiguous().bfloat16()
    x = (torch.randn(B, d, device="cuda") + 0.5).bfloat16()
    b_enc = (0.01 * torch.randn(n_features, device="cuda")).bfloat16()
    b_dec = (0.5 + 0.1 * torch.randn(d, device="cuda")).bfloat16()
    return x, W_enc, b_enc, b_dec, W_dec.bfloat16()


def run_cutlass_routes(name: str, B: int, d: int, n_features: int, k: int, k_aux: int) -> None:
    """The TopK routes over the experimental CUTLASS GEMM alone (`--only cutlass`): what changes when
    that extension's kernels change, in seconds rather than the whole run's minutes. (The shape's k_aux
    is not used: no AuxK stream runs over CUTLASS's maxima.)"""
    x, W_enc, b_enc, b_dec, _ = _problem(B, d, n_features)
    _cutlass_routes(name, x, W_enc, b_enc, b_dec, reference.pre_activation(x, W_enc, b_enc, b_dec), k)
    torch.cuda.synchronize()
    print(f"sanitize_kernels {name}, the CUTLASS routes alone (B={B}, d={d}, F={n_features}, k={k}): "
          "every kernel ran and matched")  # fmt: skip


def _cutlass_routes(name: str, x, W_enc, b_enc, b_dec, pre, k: int) -> None:
    """The row filter over the CUTLASS GEMM's group maxima in every configuration the tuner may take, the
    warp select's included, where the extension is built and takes the operands; each checked."""
    if not (cutlass_gemm.available() and cutlass_gemm.takes(x, W_enc)):
        return
    switches = cutlass_gemm.SELECT_ROUTE, cutlass_gemm.SELECT_RAISE_BY_COUNT  # restored after: tests run this
    cutlass_gemm.SELECT_ROUTE = True  # the warp select too, even where FASTSAE_CUTLASS_SELECT=0
    try:
        for cfg in filter.group_max_configs(k, 0, W_enc.shape[1]):
            for by_count in (False, True) if cfg["SELECT"] == "warp" else (False,):  # both ways to raise its bound
                cutlass_gemm.SELECT_RAISE_BY_COUNT = by_count
                label = f"{name} CUTLASS {cutlass_gemm.VARIANTS[cfg['VARIANT']].name} select {cfg['SELECT']}"
                vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None, route=("row_filter", cfg))
                assert_topk_matches(vals, idx, pre, k, TOLERANCE, f"{label} raise by count {by_count}")
    finally:
        cutlass_gemm.SELECT_ROUTE, cutlass_gemm.SELECT_RAISE_BY_COUNT = switches


def run_shape(name: str, B: int, d: int, n_features: int, k: int, k_aux: int, all_configs: bool = True) -> None:
    x, W_enc, b_enc, b_dec, W_dec = _problem(B, d, n_features)
    dead = torch.rand(n_features, device="cuda") < 0.3
    pre = reference.pre_activation(x, W_enc, b_enc, b_dec)
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    routes = encode.topk_routes(k, k_aux, n_features)
    if not all_configs:  # the first filter configuration and every other route
        first_filter = next((route for route in routes if route[0] == "filter"), None)
        routes = [route for route in routes if route[0] != "filter" or route is first_filter]
    for route in routes:
        vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead, route=route)
        assert_topk_matches(vals, idx, pre, k, TOLERANCE, f"{name} {route[0]}")
        assert_topk_matches(aux_vals, aux_idx, dead_pre, k_aux, TOLERANCE, f"{name} {route[0]} aux")
        if route[0] in ("filter", "row_filter"):  # a capacity below k overflows every row: the fallback
            cfg = {**route[1], "CAP": max(1, triton.next_power_of_2(k) // 2)}  # recomputes them all
            vals, idx, _, _ = encode.encode_topk(x, W_enc, b_enc, b_dec, k, 0, None, route=(route[0], cfg))
            assert_topk_matches(vals, idx, pre, k, TOLERANCE, f"{name} {route[0]} fallback")
    _cutlass_routes(name, x, W_enc, b_enc, b_dec, pre, k)
    vals, idx, counts = encode.encode_topk_positive_counts(x, W_enc, b_enc, b_dec, k)
    assert_topk_matches(vals, idx, pre, k, TOLERANCE, f"{name} positive counts")
    assert_positive_counts_match(counts, pre, ROUNDING_BAND, f"{name} positive counts")

    vals, idx, aux_vals, aux_idx = encode.encode_topk(x, W_enc, b_enc, b_dec, k, k_aux, dead)
    grad_vals, grad_aux = torch.randn_like(vals), torch.randn_like(aux_vals)
    expected = reference.encode_topk_backward(grad_vals, grad_aux, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx)
    previous_route = scatter.ROUTE
    for sums_route, deterministic in (("atomic", False), ("blocked", False), ("auto", True)):
        scatter.ROUTE = sums_route
        torch.use_deterministic_algorithms(deterministic)
        grads = encode.encode_topk_backward(grad_vals, grad_aux, x, W_enc, b_dec, vals, idx, aux_vals, aux_idx, True)
        for grad_name, actual, want in zip(("dx", "dW_enc", "db_enc", "db_dec"), grads, expected):
            assert_close(actual.float(), want.float(), TOLERANCE, f"{name} {grad_name} {sums_route} {deterministic=}")
    scatter.ROUTE = previous_route
    torch.use_deterministic_algorithms(False)

    threshold = torch.rand(n_features, device="cuda").bfloat16()
    for cut in (None, threshold):
        acts = encode.encode_relu(x, W_enc, b_enc, b_dec, cut)
        expected_acts = reference.encode_relu(x, W_enc, b_enc, b_dec, cut)
        assert_close(acts.float(), expected_acts.float(), TOLERANCE, f"{name} relu threshold={cut is not None}")

    want_x_hat = reference.decode_sparse(vals, idx, W_dec, b_dec).float()
    for cfg in decode._DECODE_CANDIDATES:  # every tile the tuner may pick
        x_hat = decode.decode_sparse(vals, idx, W_dec, b_dec, cfg)
        assert_close(x_hat.float(), want_x_hat, TOLERANCE, f"{name} decode {cfg}")
    grad_out = torch.randn_like(x_hat)
    dvals, dW_dec = decode.decode_sparse_backward(grad_out, vals, idx, W_dec)
    want_dvals, want_dW = reference.decode_sparse_backward(grad_out, vals, idx, W_dec)
    assert_close(dvals.float(), want_dvals.float(), TOLERANCE, f"{name} decode dvals")
    assert_close(dW_dec.float(), want_dW.float(), TOLERANCE, f"{name} decode dW_dec")
    grad_vals = torch.randn_like(want_dvals)
    want_coef = torch.where(vals > 0, want_dvals.float() + grad_vals.float(), 0.0)  # the TopK step's coefficients
    for cfg in decode._dvals_candidates():  # every tile the tuner may pick
        dvals = decode.sparse_dvals(grad_out, vals, idx, W_dec, cfg)
        assert_close(dvals.float(), want_dvals.float(), TOLERANCE, f"{name} decode dvals {cfg}")
        coef = decode.sparse_dvals(grad_out, vals, idx, W_dec, cfg, grad_vals=grad_vals)
        assert_close(coef.float(), want_coef, TOLERANCE, f"{name} decode coef {cfg}")
    # Codes as BatchTopK's: each row's nonzero codes first, zeros after them (the decode's loop stops at a
    # program's last nonzero code), and d vals of the fired codes only, in every tile.
    kept = torch.randint(0, k + 1, (B, 1), device="cuda")
    prefix = torch.where(torch.arange(k, device="cuda") < kept, vals, 0)
    want = reference.decode_sparse(prefix, idx, W_dec, b_dec).float()
    assert_close(decode.decode_sparse(prefix, idx, W_dec, b_dec).float(), want, TOLERANCE, f"{name} decode prefix")
    want_fired = reference.decode_sparse_backward(grad_out, prefix, idx, W_dec, fired_only=True)[0].float()
    for cfg in decode._dvals_candidates():
        fired = decode.sparse_dvals(grad_out, prefix, idx, W_dec, cfg, fired_only=True)
        assert_close(fired.float(), want_fired, TOLERANCE, f"{name} decode fired-only dvals {cfg}")

    # The threshold-first BatchTopK codes through each filter route, given the batch's own threshold
    batch_threshold = pre.relu().flatten().topk(B * k).values[-1]
    if batch_threshold > 0:  # otherwise the route hands every batch back
        band = 1e-2 * float(pre.abs().max())
        for route in batch_filter.routes(k, n_features):
            codes = batch_filter.threshold_first_codes(x, W_enc, b_enc, b_dec, k, batch_threshold, route=route)
            assert codes is not None, f"{name} threshold-first {route[0]} handed the batch back"
            assert_batchtopk_matches(reference.scatter_codes(*codes, n_features), pre, k, band, f"{name} {route[0]}")

    grad = torch.randn_like(W_dec)
    expected_grad = reference.remove_parallel_grad(W_dec, grad)
    decoder.remove_parallel_grad_(W_dec, grad)
    assert_close(grad.float(), expected_grad.float(), TOLERANCE, f"{name} remove_parallel_grad")
    rows = 3 * W_dec
    decoder.normalize_rows_(rows)
    assert_close(rows.float(), reference.normalize_decoder_rows(W_dec).float(), TOLERANCE, f"{name} normalize rows")
    moments = [torch.randn_like(W_dec), torch.rand_like(W_dec)]
    expected_adam = reference.decoder_adam(W_dec, grad, *moments, 3, 1e-3, 0.9, 0.999, 1e-8)
    decoder.decoder_adam_(W_dec, grad, *moments, 3, 1e-3, 0.9, 0.999, 1e-8)
    for part, actual, want in zip(("W_dec", "exp_avg", "exp_avg_sq"), (W_dec, *moments), expected_adam):
        assert_close(actual.float(), want.float(), TOLERANCE, f"{name} decoder_adam {part}")
    sums = loss.reconstruction_sums(x_hat, x)
    for part, actual, want in zip(("error", "deviations"), sums, reference.reconstruction_sums(x_hat, x)):
        assert_close(actual, want, TOLERANCE, f"{name} reconstruction_sums {part}")
    grad_sums = torch.randn(2, device="cuda")
    grads = loss.reconstruction_sums_backward(*grad_sums, x_hat, x, True, True)
    for part, actual, want in zip(("x_hat", "x"), grads, reference.reconstruction_sums_backward(*grad_sums, x_hat, x)):
        assert_close(actual.float(), want.float(), TOLERANCE, f"{name} reconstruction_sums backward {part}")
    # AuxK's dense selection over the dead features' pre-activations, at most the MAX_ROW it takes
    dead_columns = pre[:, dead][:, : auxk.MAX_ROW].bfloat16()
    if dead_columns.shape[1] >= k_aux:
        aux_rows = auxk.row_topk_indices(dead_columns, k_aux)
        aux_vals = dead_columns.gather(1, aux_rows).relu()
        assert_topk_matches(aux_vals, aux_rows, dead_columns, k_aux, TOLERANCE, f"{name} auxk row top-k")
        aux_codes = auxk.row_topk_codes(dead_columns, dead_columns.shape[1], k_aux, torch.bfloat16)
        expected_codes = torch.zeros_like(dead_columns).scatter_(1, aux_rows, aux_vals)
        assert torch.equal(aux_codes, expected_codes), f"{name} auxk row top-k codes"
        grad_pre = torch.randn_like(dead_columns)
        expected_masked = torch.where(aux_codes > 0, grad_pre, 0)
        masked_sums = columns.masked_column_sums_(grad_pre, aux_codes)
        assert torch.equal(grad_pre, expected_masked), f"{name} masked column sums' mask"
        assert_close(masked_sums, expected_masked.double().sum(0), TOLERANCE, f"{name} masked column sums")
    filter.center(x, b_dec, torch.bfloat16)  # also run by the encode; here at every shape on its own
    torch.cuda.synchronize()
    print(f"sanitize_kernels {name} (B={B}, d={d}, F={n_features}, k={k}, k_aux={k_aux}): every kernel ran and matched")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--filter-configs", choices=("all", "first"), default="all")
    parser.add_argument("--only", choices=("all", "cutlass"), default="all", help="cutlass: its routes alone")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for name in args.shapes.split(","):
        if args.only == "cutlass":
            run_cutlass_routes(name, *SHAPES[name])
        else:
            run_shape(name, *SHAPES[name], all_configs=args.filter_configs == "all")


if __name__ == "__main__":
    main()
