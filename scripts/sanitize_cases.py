"""A representative subset of decode cases for compute-sanitizer (memcheck, racecheck, synccheck).

Small on purpose (the sanitizers slow kernels down by orders of magnitude) but covering: split and
unsplit requests, zero-length requests, a partial last page with NaN behind it, causal s_q > 1,
h_kv > 1, two row tiles, and several requests per CTA; an FP8 (e4m3) cache with both query forms,
whose converter warpgroup racecheck watches, and 16 and 32 rows of it with an e4m3 q (the narrow
kernel's FP8 ring; its warpgroups taking pages in turn, with 16 or 32 rows; on long parts, planned over 8
parts, its two loader lanes taking pages in turn too), and 64 and 128 rows with an
e4m3 q through decode_ring.cu (`--fp8`: those cases alone; `--decode-fp8`: those of more than 32 rows with
an e4m3 q also through decode.cu's FP8 path, which kernels.RING_FP8 leaves undispatched).
`--variant 'NAME: ITEM ...'` runs them on a build of scripts/kernel_ab.py's variant spec (a candidate's
defines or tree), with a kernel cache of its own. Exits non-zero on a wrong result.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "devtools"))
from gpu_cases import cap_plan_parts, check, fresh_seed, run  # noqa: E402

from flashmla_cupy import reference  # noqa: E402

CASES = [  # batch, seqlen_q, heads_q, heads_kv, seqlens, causal, dtype (q's), kv_dtype (None: q's)[, parts]
    (3, 1, 128, 1, [700, 0, 130], False, "bf16", None),
    (5, 2, 16, 2, [64, 1, 3000, 0, 257], True, "fp16", None),
    (40, 1, 32, 1, [100] * 40, False, "bf16", None),
]
FP8_CASES = [
    (3, 1, 128, 1, [700, 0, 130], False, "e4m3", "e4m3"),          # 128 rows, e4m3 q: FP8 scores
    (5, 2, 64, 2, [64, 1, 3000, 0, 257], True, "e4m3", "e4m3"),    # 64 rows, s_q = 2 causal, h_kv = 2
    (5, 2, 16, 2, [64, 1, 3000, 0, 257], True, "bf16", "e4m3"),
    (5, 2, 16, 2, [64, 1, 3000, 0, 257], True, "e4m3", "e4m3"),   # 16 rows, e4m3 q: the narrow kernel
    (5, 2, 16, 1, [64, 1, 3000, 0, 257], True, "e4m3", "e4m3"),   # 32 rows: wgmma N = 32
    # Parts of ~49 pages (a plan of at most 8 parts: payload >= kLongPartPages), 16 and 32 rows: the
    # narrow kernel's two loader lanes.
    (2, 1, 16, 1, [12000, 11001], False, "e4m3", "e4m3", 8),
    (2, 2, 16, 1, [12000, 11001], True, "e4m3", "e4m3", 8),
]


def main() -> int:
    if "--variant" in sys.argv[1:]:   # before anything is compiled or loaded
        sys.path.insert(0, os.path.dirname(__file__))
        import tempfile

        import kernel_ab

        os.environ["FLASHMLA_CUPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="sanitize_variant_")
        kernel_ab.apply(kernel_ab.parse_variant(sys.argv[sys.argv.index("--variant") + 1]))
    from flashmla_cupy import kernels, lookup

    cases = FP8_CASES if "--fp8" in sys.argv[1:] else CASES + FP8_CASES
    # With --decode-fp8 the e4m3 cases of more than 32 rows also run through decode.cu's FP8 path
    # (kernels.RING_FP8 off), the fallback that the ring kernel replaced.
    shipped = kernels.RING_FP8
    also = "--decode-fp8" in sys.argv[1:]
    fallback_cases = [c for c in cases if also and c[6] == c[7] == "e4m3" and c[1] * c[2] // c[3] > 32]
    runs = [(case, shipped) for case in cases] + [(case, not shipped) for case in fallback_cases]
    capped = False
    for (b, s_q, h_q, h_kv, seqlens, causal, dtype, kv_dtype, *parts), ring in runs:
        if ring != kernels.RING_FP8:
            kernels.RING_FP8 = ring
            lookup.remembered().clear()   # calls prepared with the other kernel
        if parts or capped:
            cap_plan_parts(parts[0] if parts else None)
            capped = bool(parts)
        seed = fresh_seed()
        case = reference.random_case(np.random.default_rng(seed), b, s_q, h_q, h_kv, np.array(seqlens), dtype,
                                     causal=causal, kv_dtype=kv_dtype)
        report = check(case, *run(case), seed, f"sanitize b={b} h_q={h_q}")
        kernel = f" (kernels.RING_FP8 = {ring})" if ring != shipped else ""
        kernel += f" (at most {parts[0]} parts)" if parts else ""
        print(f"b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} q {dtype} cache {kv_dtype or dtype}{kernel}: "
              f"ok, worst out abs {report['out_max_abs']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
