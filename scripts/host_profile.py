"""Host (CPU) cost of one eager `flash_mla_with_kvcache` call with torch inputs, and where it goes.

Launches are asynchronous, so timing a burst of calls whose GPU work is short measures the Python and
driver path alone. The problem is tiny on purpose: were a call's GPU work longer than its host work, the
launch queue would fill and the burst would time the GPU instead. The host path does not depend on the
sizes (h_q = 128 keeps the two-row-tile launch of real decode shapes). Prints microseconds per call,
then the cProfile functions with the most own time.

    python scripts/host_profile.py [--calls 300] [--dtype fp8]   # fp8: e4m3 q and cache, with both descales
    python scripts/host_profile.py --cpu-mock   # no GPU: fake torch, no-op driver (devtools/fake_cuda.py)
    python scripts/host_profile.py --baseline DIR [--rounds 5] [--cpu-mock]   # before/after

`--baseline DIR` compares this tree with another version's source tree, e.g. one made by
`mkdir .baseline && git archive <commit> | tar -x -C .baseline` (ignored by git; carry it to a remote
machine). Each version runs its own copy of this script, with its own package and fakes, in fresh
processes taking turns, so that a drift in the machine's speed hits both alike; the best burst of
each is compared.

`--cpu-mock` times the package's own Python on a machine without a GPU. Its torch is a pure-Python
stand-in and its driver returns at once, so real tensor attribute reads, `torch.empty` and launches
add to its numbers on a GPU; use it to compare versions of the package, not as a GPU figure.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import subprocess
import sys

import bench  # scripts/ is this script's first sys.path entry
from bench_cases import Case

B, S_Q, H_Q, PAGES = 4, 1, 128, 2  # GPU work per call well below the host work (see above)


def gpu_inputs(dtype: str):
    import torch

    x = bench.make_inputs(torch, Case(B, S_Q, H_Q, PAGES * 64, dtype=dtype), seed=0)
    return torch, (x.q, x.k_cache, x.block_table, x.seqlens), (x.descale_q, x.descale_k)


def mock_inputs(dtype: str):
    """The same shapes as fake torch tensors, with the package pointed at a fake H100."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "devtools"))
    import fake_cuda

    torch = fake_cuda.FakeTorchModule()
    fake_cuda.install(setattr, dict.__setitem__, fake_cuda.stub_driver(), torch)
    element = getattr(torch, bench.TORCH_DTYPES[dtype])
    descales = (torch.tensor((1,), torch.float32), torch.tensor((1,), torch.float32)) if dtype == "fp8" else (None, None)
    return torch, (torch.tensor((B, S_Q, H_Q, 576), element), torch.tensor((B * PAGES, 64, 1, 576), element),
                   torch.tensor((B, PAGES), torch.int32), torch.tensor((B,), torch.int32)), descales


FUNCTIONS = ("flash_mla_with_kvcache", "get_mla_metadata")
_TIMING = re.compile(r"host time per (\w+) call: ([\d.]+) us[^;]*(?:; best of \d+ bursts ([\d.]+) us)?")


def _measure(tree: str, argv: list[str]) -> dict[str, float]:
    """One run of `tree`'s own copy of this script: microseconds per call (best burst) by function."""
    # The tree first, ahead of whatever else the path holds (carried wheels, this tree).
    path = os.pathsep.join(filter(None, (os.path.abspath(tree), os.environ.get("PYTHONPATH"))))
    done = subprocess.run([sys.executable, os.path.join(tree, "scripts", "host_profile.py"), *argv, "--no-profile"],
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"host_profile in {tree} failed:\n{done.stderr[-2000:]}")
    found = {m.group(1): float(m.group(3) or m.group(2)) for m in _TIMING.finditer(done.stdout)}
    return {name: found[name] for name in FUNCTIONS}


def compare(baseline: str, argv: list[str], rounds: int) -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs: dict[str, list[dict[str, float]]] = {baseline: [], here: []}
    for _ in range(rounds):
        for tree in runs:
            runs[tree].append(_measure(tree, argv))
    mode = "CPU-mocked" if "--cpu-mock" in argv else "GPU"
    print(f"{mode} eager host time per call, best of {rounds} alternating runs ({' '.join(argv)}):")
    for name in FUNCTIONS:
        before, after = (min(run[name] for run in runs[tree]) for tree in (baseline, here))
        print(f"  {name}: {before:.1f} us ({baseline}) -> {after:.1f} us (this tree), "
              f"{after - before:+.1f} us ({(after - before) / before:+.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1, help="bursts to time; the best is reported too")
    parser.add_argument("--cpu-mock", action="store_true", help="no GPU: fake torch and driver (see above)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile listing")
    parser.add_argument("--dtype", default="bf16", choices=tuple(bench.TORCH_DTYPES),
                        help="q and cache type (fp8: e4m3 q and cache with both descales)")
    parser.add_argument("--baseline", metavar="DIR", help="also time the source tree DIR and compare (see above)")
    parser.add_argument("--rounds", type=int, default=5, help="with --baseline: runs of each tree")
    args = parser.parse_args()
    if args.baseline:
        compare(args.baseline, ["--calls", str(args.calls), "--repeats", str(args.repeats)]
                + (["--dtype", args.dtype] if args.dtype != "bf16" else [])   # older trees know bf16 alone
                + (["--cpu-mock"] if args.cpu_mock else []), args.rounds)
        return

    torch, (q, k_cache, block_table, seqlens), (descale_q, descale_k) = (
        mock_inputs(args.dtype) if args.cpu_mock else gpu_inputs(args.dtype))
    import flashmla_cupy

    fp8 = args.dtype == "fp8"
    meta, splits = flashmla_cupy.get_mla_metadata(seqlens, S_Q * H_Q, 1, is_fp8_kvcache=fp8)

    def call():
        return flashmla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits,
                                                    descale_q=descale_q, descale_k=descale_k)

    def plan():
        return flashmla_cupy.get_mla_metadata(seqlens, S_Q * H_Q, 1, is_fp8_kvcache=fp8)

    label = ("CPU-mocked (fake torch, no-op driver)" if args.cpu_mock else "GPU") + (f", {args.dtype}" if fp8 else "")
    for name, fn in (("flash_mla_with_kvcache", call), ("get_mla_metadata", plan)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        times = bench.per_call_us(fn, args.calls, args.repeats)
        torch.cuda.synchronize()
        print(f"{label} host time per {name} call: {times[-1]:.1f} us ({args.calls} calls)"
              + (f"; best of {args.repeats} bursts {min(times):.1f} us" if args.repeats > 1 else ""))

    if args.no_profile:
        return
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        call()
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
