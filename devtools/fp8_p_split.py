"""How exact P V stays when P goes to FP8 tensor cores (numpy, no GPU): P rounded to bf16 (what decode.cu
does today), to one e4m3 value (FlashMLA's FP8 kernel), or split into two e4m3 parts,
hi = e4m3(P * 2^8) and lo = e4m3(P * 2^8 - hi) (two FP8 wgmmas, which cost what one 16-bit one does; the
2^8 keeps the parts normal), each against the float64 product of the same e4m3 V. Reports SPEC's
cosine difference and the largest absolute error per (tokens, score spread).

    python devtools/fp8_p_split.py

It models the rounding of P only: the tensor cores' FP8 accumulation (fewer bits than fp32 inside a
wgmma) is not modelled and has to be measured on the GPU.

It also checks the register layout such a kernel would rely on: with the tokens of each 32-token k-step
stored in V^T in the order `token_of_k_position` gives, every byte of an m64nNk32 e4m3 A fragment of P
(P from registers) comes from the same thread's fp32 S accumulator (m64n64), so P needs no shuffles
(CuTe's ALayout_64x32 and CLayout_64xN, cute/atom/mma_traits_sm90_gmma.hpp).
"""
import ml_dtypes
import numpy as np

E4M3, BF16 = ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16
SPLIT_SCALE = 2.0 ** 8


def token_of_k_position(p: int) -> int:
    """The token (0..31 of a k-step) that V^T keeps at k-position p, so that P's A fragment is the S
    accumulator's own values: position 16h + 4t + i holds token 16h + 8(i // 2) + 2t + i % 2."""
    return 16 * (p // 16) + 8 * (p % 4 // 2) + 2 * (p % 16 // 4) + p % 2


def _a_fragment(thread: int, value: int) -> tuple[int, int]:
    """(row, k) of value `value` (register value // 4, byte value % 4) of an 8-bit A fragment:
    ALayout_64x32, thread (4,8,4):(256,1,16), value (4,2,2):(64,8,1024), column-major 64 x 32."""
    t0, t1, t2 = thread % 4, thread // 4 % 8, thread // 32
    v0, v1, v2 = value % 4, value // 4 % 2, value // 8
    index = 256 * t0 + t1 + 16 * t2 + 64 * v0 + 8 * v1 + 1024 * v2
    return index % 64, index // 64


def _accumulator(thread: int, value: int) -> tuple[int, int]:
    """(row, column) of fp32 accumulator value `value`: CLayout_64xN, thread (4,8,4):(128,1,16), value
    (2,2,N/8):(64,8,512), column-major 64 x N."""
    t0, t1, t2 = thread % 4, thread // 4 % 8, thread // 32
    v0, v1, v2 = value % 2, value // 2 % 2, value // 4
    index = 128 * t0 + t1 + 16 * t2 + 64 * v0 + 8 * v1 + 512 * v2
    return index % 64, index // 64


def check_fragment_permutation(page: int = 64) -> bool:
    """Whether, with V^T's k order permuted by token_of_k_position, each thread finds every byte of
    its P fragments (k-steps of 32 tokens over a 64-token page) among its own S accumulator values."""
    held = {t: {_accumulator(t, v) for v in range(page // 2)} for t in range(128)}
    return all((row, 32 * step + token_of_k_position(k)) in held[t]
               for t in range(128) for step in range(page // 32) for row, k in map(lambda v: _a_fragment(t, v), range(16)))


def rounded(x, dtype):
    return x.astype(dtype).astype(np.float64)


def errors(exact, y):
    cos = 1 - 2 * (exact * y).sum() / (exact * exact + y * y).sum()
    return cos, np.abs(exact - y).max()


def main(rows=64, dim=512, seed=0):
    print("P's e4m3 A fragments come from each thread's own S accumulator (V^T tokens permuted):",
          check_fragment_permutation())
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
