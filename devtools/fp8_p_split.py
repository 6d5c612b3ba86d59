"""How exact P V stays when P goes to FP8 tensor cores (numpy, no GPU): P rounded to bf16 (what decode.cu
does today), to one e4m3 value (FlashMLA's FP8 kernel), or split into two e4m3 parts,
hi = e4m3(P * 2^8) and lo = e4m3(P * 2^8 - hi) (two FP8 wgmmas, which cost what one 16-bit one does; the
2^8 keeps the parts normal), each against the float64 product of the same e4m3 V. Reports SPEC's
cosine difference and the largest absolute error per (tokens, score spread).

    python devtools/fp8_p_split.py

It models the rounding of P only: the tensor cores' FP8 accumulation (fewer bits than fp32 inside a
wgmma) is not modelled and has to be measured on the GPU.
"""
import ml_dtypes
import numpy as np

E4M3, BF16 = ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16
SPLIT_SCALE = 2.0 ** 8


def rounded(x, dtype):
    return x.astype(dtype).astype(np.float64)


def errors(exact, y):
    cos = 1 - 2 * (exact * y).sum() / (exact * exact + y * y).sum()
    return cos, np.abs(exact - y).max()


def main(rows=64, dim=512, seed=0):
    rng = np.random.default_rng(seed)
    print(f"{'tokens':>6} {'spread':>6} | {'bf16 P: cos, max abs':>24} | {'e4m3 hi+lo':>22} | {'one e4m3':>22}")
    for tokens in (2, 7, 64, 1000, 4096):
        for spread in (1.0, 3.0, 9.0):
            scores = rng.standard_normal((rows, tokens)) * spread
            p = np.exp(scores - scores.max(1, keepdims=True))       # unnormalised, in (0, 1]
            v = rounded(np.clip(rng.standard_normal((tokens, dim)) / 10, -1, 1), E4M3)
            total = p.sum(1, keepdims=True)
            exact = p @ v / total
            hi = rounded(p * SPLIT_SCALE, E4M3)
            lo = rounded(p * SPLIT_SCALE - hi, E4M3)
            cells = [errors(exact, rounded(p, BF16) @ v / total),
                     errors(exact, (hi + lo) @ v / SPLIT_SCALE / total),
                     errors(exact, rounded(p, E4M3) @ v / total)]
            print(f"{tokens:>6} {spread:>6} | " + " | ".join(f"{c:9.2e}, {a:9.2e}".rjust(22) for c, a in cells))


if __name__ == "__main__":
    main()
