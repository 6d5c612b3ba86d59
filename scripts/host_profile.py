"""Host (CPU) cost of one eager `flash_mla_with_kvcache` call with torch inputs, and where it goes.

Launches are asynchronous, so timing a burst of calls whose GPU work is short measures the Python and
driver path alone. Prints microseconds per call, then the cProfile functions with the most own time.

    python scripts/host_profile.py [--calls 300]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()

    import torch

    import flashmla_cupy

    b, s_q, h_q, pages = 64, 1, 128, 16  # a short-context case, where host time shows most
    q = torch.randn(b, s_q, h_q, 576, device="cuda").bfloat16()
    k_cache = torch.randn(b * pages, 64, 1, 576, device="cuda").bfloat16()
    block_table = torch.randperm(b * pages, device="cuda").int().view(b, pages)
    seqlens = torch.full((b,), pages * 64, dtype=torch.int32, device="cuda")
    meta, splits = flashmla_cupy.get_mla_metadata(seqlens, s_q * h_q, 1)

    def call():
        return flashmla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits)

    for _ in range(20):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.calls):
        call()
    host = (time.perf_counter() - start) / args.calls * 1e6
    torch.cuda.synchronize()
    print(f"host time per call: {host:.1f} us ({args.calls} calls)")

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        call()
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
