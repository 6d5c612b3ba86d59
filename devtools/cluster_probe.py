"""Can this machine launch thread-block clusters, and does a launch through our driver path ask for them
correctly? (GPU; CuPy.)

On the lent H200 (2026-12-01, eighteenth session) the decode kernel launched with the cluster attribute
(4, 1, 1) failed with CUDA error 912 (cluster misconfiguration), and cuOccupancyMaxActiveClusters refused
every cluster shape, even 1 x 1 x 1, for both decode kernels
(benchmarks/results/2026-12-01-h200-74f79e6-cluster-probe.txt). The cause was ours: the attribute's value
was assigned as bytes to a c_char array, which stops at the first zero byte, so every shape reached the
driver as (x, 0, 0) (fixed in launch.launch_attributes; nineteenth session: every step below passes and a
part's four row tiles run as one cluster, -cluster-probe.json). This probe separates the machine from our path:

1. a plain kernel launched plainly (CuPy): the baseline;
2. a kernel compiled with `__cluster_dims__(2, 1, 1)`, launched plainly: does the machine run clusters?
3. the plain kernel through cuLaunchKernelEx with the cluster attribute (2, 1, 1), built as
   flashmla_cupy.launch builds its configs: does our attribute work?
4. cuOccupancyMaxActiveClusters for those and for our decode kernels at cluster sizes 1 to 4.

Each kernel writes, per block, its cluster size and rank (%cluster_nctarank, %cluster_ctarank), so a
launch that "worked" without forming clusters shows size 1.

    python devtools/cluster_probe.py            # prints one JSON report
"""
import ctypes
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import cupy as cp  # noqa: E402

from flashmla_cupy import launch, variants  # noqa: E402

SOURCE = r'''
__device__ __forceinline__ unsigned cluster_size() {
  unsigned n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
  return n;
}
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
extern "C" __global__ void ranks(unsigned* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = cluster_size() << 16 | cluster_rank();
}
extern "C" __global__ void __cluster_dims__(2, 1, 1) ranks_fixed(unsigned* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = cluster_size() << 16 | cluster_rank();
}
'''
BLOCKS, THREADS = 4, 32


def cluster_config(grid, block, shared_bytes: int, cluster):
    """A CUlaunchConfig with one cluster-dimension attribute (and the attribute, to keep it alive)."""
    attr = launch.launch_attributes(cluster=cluster)
    config = launch._LaunchConfig(*grid, *block, shared_bytes, None,
                                  ctypes.cast(attr, ctypes.POINTER(launch._LaunchAttribute)), 1)
    return config, attr


def occupancy(function_ptr: int, grid, block, shared_bytes: int, cluster) -> dict:
    lib = launch._driver()
    lib.cuOccupancyMaxActiveClusters.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_void_p]
    config, _attr = cluster_config(grid, block, shared_bytes, cluster)
    clusters = ctypes.c_int(-1)
    status = lib.cuOccupancyMaxActiveClusters(ctypes.byref(clusters), ctypes.c_void_p(function_ptr),
                                              ctypes.byref(config))
    return {"status": status, "max_active_clusters": clusters.value}


def read_ranks(out) -> list:
    return [{"size": int(v) >> 16, "rank": int(v) & 0xFFFF} for v in cp.asnumpy(out)]


def plain_launch(function, out) -> dict:
    try:
        function((BLOCKS,), (THREADS,), (out,))
        cp.cuda.get_current_stream().synchronize()
        return {"status": 0, "blocks": read_ranks(out)}
    except Exception as exc:  # a refused launch is the answer
        return {"error": f"{type(exc).__name__}: {exc}"}


def attribute_launch(function_ptr: int, out, cluster) -> dict:
    config, _attr = cluster_config((BLOCKS, 1, 1), (THREADS, 1, 1), 0, cluster)
    config.stream = cp.cuda.get_current_stream().ptr
    address = ctypes.c_uint64(out.data.ptr)
    pointers = (ctypes.c_void_p * 1)(ctypes.addressof(address))
    status = launch._driver().cuLaunchKernelEx(ctypes.byref(config), ctypes.c_void_p(function_ptr), pointers, None)
    if status:
        return {"status": status}
    cp.cuda.get_current_stream().synchronize()
    return {"status": 0, "blocks": read_ranks(out)}


def main() -> int:
    module = cp.RawModule(code=SOURCE)
    plain, fixed = module.get_function("ranks"), module.get_function("ranks_fixed")
    grid, block = (BLOCKS, 1, 1), (THREADS, 1, 1)
    report = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
              "driver": cp.cuda.runtime.driverGetVersion()}
    report["1 plain kernel, plain launch"] = plain_launch(plain, cp.zeros(BLOCKS, dtype=cp.uint32))
    report["2 __cluster_dims__(2) kernel, plain launch"] = plain_launch(fixed, cp.zeros(BLOCKS, dtype=cp.uint32))
    report["3 plain kernel, cuLaunchKernelEx with cluster (2, 1, 1)"] = attribute_launch(
        plain.kernel.ptr, cp.zeros(BLOCKS, dtype=cp.uint32), (2, 1, 1))
    report["4 occupancy"] = {
        "plain, cluster 1": occupancy(plain.kernel.ptr, grid, block, 0, (1, 1, 1)),
        "plain, cluster 2": occupancy(plain.kernel.ptr, grid, block, 0, (2, 1, 1)),
        "__cluster_dims__(2), cluster 2": occupancy(fixed.kernel.ptr, grid, block, 0, (2, 1, 1)),
    }
    for variant in variants.all_variants():
        if variant.name in ("decode_bf16", "decode_narrow_bf16_r16"):
            loaded = launch.get_function(variant, 0)
            for size in (1, 2, 3, 4):
                report["4 occupancy"][f"{variant.name}, cluster {size}"] = occupancy(
                    loaded.handle, (12, 1, 32), (variant.threads, 1, 1), variant.shared_bytes, (size, 1, 1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
