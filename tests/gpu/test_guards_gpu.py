"""Bad device contents on the GPU (devtools/faults.py): unchecked, the documented result (NaN rows for
the offending requests, the others exact); checked, an InvalidInputError naming them.
scripts/guard_cases.py runs the same calls under compute-sanitizer memcheck, which shows that no
kernel touches memory outside the arrays."""
from __future__ import annotations

import numpy as np
import pytest

import faults
from flashmla_cupy import reference
from flashmla_cupy.errors import InvalidInputError
from flashmla_cupy.reference import HEAD_DIM_V
from gpu_cases import fresh_seed, to_device

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def case():
    """(seed, case, its float64 reference): one fresh case for the module, the reference computed once."""
    seed = fresh_seed()
    c = faults.case(seed)
    return seed, c, c.reference()


@pytest.mark.parametrize("build", [b for _, b in faults.UNCHECKED], ids=[n for n, _ in faults.UNCHECKED])
def test_unchecked_fault_gives_the_documented_result(case, build):
    import cupy

    seed, c, ref = case
    fault = build(c)
    out, lse = faults.run(c, fault)
    cupy.cuda.runtime.deviceSynchronize()   # an illegal access would surface here
    try:
        faults.verify(fault, out, lse, c, ref)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None
    # The device is still healthy: a valid call afterwards is exact.
    good = faults.Fault("valid", exact=list(range(len(faults.SEQLENS))))
    faults.verify(good, *faults.run(c, good), c, ref)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_bad_last_page_makes_every_causal_row_nan(dtype):
    """Causal rows may see none of a bad page: here the victim's last page holds one token, which the
    first three of its four query rows do not see. Their P there is 0, so only V's NaN reaches their
    out, and their lse must come out NaN too (the epilogue carries O's NaN into the row sums)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    seqlens = np.array([129, 700, 65], dtype=np.int32)  # requests 0 and 2 end on a one-token page
    c = reference.random_case(rng, len(seqlens), 4, 16, 1, seqlens, dtype, causal=True)
    ref = c.reference()
    for victim, value in ((0, c.k_cache.shape[0]), (2, -1)):
        table = c.block_table.copy()
        table[victim, faults.pages(seqlens[victim]) - 1] = value
        fault = faults.Fault(f"block {value} on the last page of request {victim}", block_table=table,
                             nan=[victim], exact=[i for i in range(len(seqlens)) if i != victim])
        try:
            faults.verify(fault, *faults.run(c, fault), c, ref)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from None


@pytest.mark.parametrize("build", [b for _, b in faults.CHECKED], ids=[n for n, _ in faults.CHECKED])
def test_checked_mode_names_each_fault(case, build):
    seed, c, _ = case
    fault = build(c)
    with pytest.raises(InvalidInputError) as info:
        faults.run(c, fault, check=True)
    arguments = [v.argument for v in info.value.violations]
    assert arguments == fault.violations, f"seed {seed}: {info.value}"
    for text in fault.named:
        assert text in str(info.value), f"seed {seed}: {text!r} not in {info.value}"


@pytest.mark.parametrize("framework", ["cupy", "torch"])
def test_checked_mode_passes_valid_calls_unchanged(case, framework):
    pytest.importorskip(framework)
    seed, c, ref = case
    good = faults.Fault("valid", exact=list(range(len(faults.SEQLENS))))
    checked = faults.run(c, good, check=True, framework=framework)
    unchecked = faults.run(c, good, check=False, framework=framework)
    assert np.array_equal(checked[0].view(np.uint16), unchecked[0].view(np.uint16)), f"seed {seed}"
    assert np.array_equal(checked[1].view(np.uint32), unchecked[1].view(np.uint32)), f"seed {seed}"
    faults.verify(good, *checked, c, ref)


def test_checked_mode_on_a_large_batch_names_the_one_bad_entry():
    """Many requests, one block (-1) and a wide row stride: every block of the check kernel counts."""
    import flashmla_cupy

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    c = reference.random_case(rng, 300, 1, 16, 1, rng.integers(0, 700, 300), "bf16")
    width = c.block_table.shape[1]
    table = np.full((300, width + 5), 2**31 - 1, dtype=np.int32)
    table[:, :width] = c.block_table
    victim = int(np.flatnonzero(c.cache_seqlens > 64)[-1])
    table[victim, 1] = -1
    q, k, lengths, wide = (to_device("cupy", x) for x in (c.q, c.k_cache, c.cache_seqlens, table))
    metadata, num_splits = flashmla_cupy.get_mla_metadata(lengths, 16, 1)
    with pytest.raises(InvalidInputError) as info:
        flashmla_cupy.flash_mla_with_kvcache(q, k, wide[:, :width], lengths, HEAD_DIM_V, metadata, num_splits,
                                             check=True)
    assert [v.argument for v in info.value.violations] == ["block_table"], f"seed {seed}"
    assert info.value.violations[0].seen == f"block_table[{victim}, 1] = -1", f"seed {seed}"


def test_checked_mode_refuses_graph_capture():
    torch = pytest.importorskip("torch")
    import flashmla_cupy

    c = faults.case(fresh_seed())
    q, k, bt, lengths = (to_device("torch", x) for x in (c.q, c.k_cache, c.block_table, c.cache_seqlens))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        metadata, num_splits = flashmla_cupy.get_mla_metadata(lengths, faults.HEADS_Q, 1)
        # prepared (and every kernel loaded) outside the capture
        flashmla_cupy.flash_mla_with_kvcache(q, k, bt, lengths, HEAD_DIM_V, metadata, num_splits, check=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(InvalidInputError) as info:
        with torch.cuda.graph(graph, stream=stream):
            flashmla_cupy.flash_mla_with_kvcache(q, k, bt, lengths, HEAD_DIM_V, metadata, num_splits, check=True)
    assert [v.argument for v in info.value.violations] == ["check"]
