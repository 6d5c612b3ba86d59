"""Is PTX's `%gridid` a tag unique to every launch, CUDA-graph replays included? (GPU; CuPy.)

Work stealing in the narrow kernel (docs/PERF_NOTES.md, thirty-first session) needs per-call claim words.
Module globals are shared by launches on other streams, where a wrong claim would be a wrong result; the
per-call workspace is not zeroed, and a graph's replays see the same workspace again. Claim words tagged
with the launch's `%gridid` (written as tag | state, a stale tag read as unclaimed) would need no reset, if
`%gridid` differs between any two launches, replays of one graph node included. The PTX ISA calls it "the
temporal grid launch number for this context"; this probe checks that on the device:

1. every block of a grid reads the same value;
2. eager launches on one stream, and interleaved on two, read distinct values;
3. the launches of a captured graph, replayed several times, read distinct values at every replay.

    python devtools/gridid_probe.py            # prints one JSON report; exit status 0 either way
"""
import json
import sys

import cupy as cp

SOURCE = r'''
extern "C" __global__ void grid_tag(unsigned long long* out, int slot) {
  unsigned long long id;
  asm volatile("mov.u64 %0, %%gridid;" : "=l"(id));
  out[slot * gridDim.x + blockIdx.x] = id;
}
'''
BLOCKS = 264  # two per SM on an H200: a grid of more than one wave
SLOTS = 8


def launch_on(kernel, stream, out, slot: int) -> None:
    with stream:
        kernel((BLOCKS,), (32,), (out, cp.int32(slot)))


def tags(out) -> list[list[int]]:
    """Each slot's values (one per block) as ints."""
    return [[int(x) for x in row] for row in out.reshape(SLOTS, BLOCKS).get()]


def main() -> dict:
    kernel = cp.RawKernel(SOURCE, "grid_tag")
    report: dict = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    a, b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)

    eager = cp.zeros(SLOTS * BLOCKS, dtype=cp.uint64)
    for slot in range(SLOTS):
        launch_on(kernel, a if slot % 2 == 0 else b, eager, slot)  # interleaved on two streams
    cp.cuda.Device().synchronize()
    rows = tags(eager)
    report["same_within_grid"] = all(len(set(row)) == 1 for row in rows)
    firsts = [row[0] for row in rows]
    report["eager"] = firsts
    report["eager_distinct"] = len(set(firsts)) == SLOTS

    graph_out = cp.zeros(SLOTS * BLOCKS, dtype=cp.uint64)
    a.begin_capture()
    for slot in range(SLOTS // 2):
        launch_on(kernel, a, graph_out, slot)
    graph = a.end_capture()
    replays = []
    for _ in range(4):
        graph.launch(stream=a)
        a.synchronize()
        replays.append([row[0] for row in tags(graph_out)[: SLOTS // 2]])
    report["replays"] = replays
    every = [tag for replay in replays for tag in replay]
    report["replays_distinct"] = len(set(every)) == len(every) and not set(every) & set(firsts)
    report["verdict"] = ("a per-launch tag" if report["same_within_grid"] and report["eager_distinct"]
                         and report["replays_distinct"] else "not a per-launch tag")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
    sys.exit(0)
