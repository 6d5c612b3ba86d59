"""The split-KV plan (flashmla_cupy/plan.py): invariants on many random batches and handmade examples."""
from __future__ import annotations

import numpy as np
import pytest

from flashmla_cupy.params import (
    META_BEGIN_PAGE,
    META_BEGIN_PIECE,
    META_BEGIN_REQUEST,
    META_END_PAGE,
    META_END_REQUEST,
    META_PAYLOAD,
    METADATA_FIELDS,
)
from flashmla_cupy.plan import (
    INT32_MAX,
    OVERHEAD_PAGES,
    PAGE_SIZE,
    num_sm_parts,
    partial_slots,
    plan_cost,
    plan_numpy,
)


def check_plan(seqlens: np.ndarray, num_parts: int, metadata: np.ndarray, num_splits: np.ndarray) -> None:
    """Every property the decode and combine kernels rely on; asserts with the offending part/request."""
    batch = len(seqlens)
    pages = [-(-max(int(s), 0) // PAGE_SIZE) for s in seqlens]
    _, payload, whole = plan_cost(seqlens, num_parts)
    assert metadata.shape == (num_parts, METADATA_FIELDS) and metadata.dtype == np.int32
    assert num_splits.shape == (batch + 1,) and num_splits.dtype == np.int32
    assert num_splits[0] == 0

    pieces_of = [dict() for _ in range(batch)]  # request -> {piece index: (begin page, end page)}
    cursor = (0, 0, 0)                           # where the next non-empty part must begin
    seen_empty = False
    for part, row in enumerate(metadata):
        assert row[META_PAYLOAD] == min(payload, INT32_MAX), f"part {part}: payload {row}, expected {payload}"
        assert (row[META_PAYLOAD + 1:] == 0).all(), f"part {part}: reserved fields {row}"
        if row[META_BEGIN_REQUEST] >= batch:
            assert list(row) == [batch, 0, batch, 0, 0, row[META_PAYLOAD], 0, 0], f"empty part {part} is {row}"
            seen_empty = True
            continue
        assert not seen_empty, f"part {part} has work after an empty part"
        first, first_page, last, end_page, first_piece = (
            int(row[META_BEGIN_REQUEST]), int(row[META_BEGIN_PAGE]), int(row[META_END_REQUEST]),
            int(row[META_END_PAGE]), int(row[META_BEGIN_PIECE]))
        assert (first, first_page, first_piece) == cursor, f"part {part} begins at {row}, expected {cursor}"
        assert first <= last < batch, f"part {part}: requests {first}..{last}"
        cost = 0
        for r in range(first, last + 1):
            begin = first_page if r == first else 0
            end = end_page if r == last else pages[r]
            piece = first_piece if r == first else 0
            assert 0 <= begin <= end <= pages[r], f"part {part}, request {r}: pages [{begin}, {end}) of {pages[r]}"
            assert end > begin or pages[r] == 0, f"part {part}: empty piece of non-empty request {r}"
            assert piece not in pieces_of[r], f"request {r} piece {piece} made twice"
            pieces_of[r][piece] = (begin, end)
            cost += end - begin + OVERHEAD_PAGES
        assert cost <= payload, f"part {part} costs {cost} > payload {payload}"
        cursor = (last, end_page, first_piece + 1 if last == first else 1) if end_page < pages[last] else (last + 1, 0, 0)
    assert cursor == (batch, 0, 0), f"work left unassigned from {cursor}"

    for r in range(batch):
        count = int(num_splits[r + 1] - num_splits[r])
        assert count == len(pieces_of[r]) >= 1, f"request {r}: num_splits says {count}, plan has {len(pieces_of[r])}"
        spans = [pieces_of[r][k] for k in range(count)]  # KeyError if piece indices are not 0..count-1
        assert spans[0][0] == 0 and spans[-1][1] == pages[r], f"request {r} pieces {spans} of {pages[r]} pages"
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"request {r} pieces {spans} not contiguous"
        if pages[r] == 0:
            assert spans == [(0, 0)], f"zero-length request {r} has pieces {spans}"
    assert num_splits[-1] <= batch + num_parts - 1, f"{num_splits[-1]} pieces > batch + parts - 1"
    if whole:
        assert num_splits[-1] == batch, f"an uncut plan has {num_splits[-1]} pieces for {batch} requests"
    assert num_splits[-1] <= partial_slots(batch, num_parts)


def random_seqlens(rng: np.random.Generator, batch: int) -> np.ndarray:
    """Mixed lengths: uniform, many zeros, a few very long, page-aligned and off-by-one."""
    kind = rng.integers(6)
    if kind == 0:
        s = rng.integers(0, 16385, batch)
    elif kind == 1:
        s = np.where(rng.random(batch) < 0.6, 0, rng.integers(1, 16385, batch))
    elif kind == 2:
        s = np.where(rng.random(batch) < 0.05, 131072, rng.integers(0, 4096, batch))
    elif kind == 3:
        s = PAGE_SIZE * rng.integers(0, 64, batch) + rng.integers(-1, 2, batch)
    elif kind == 4:
        s = rng.integers(0, 200, batch)
    else:  # nearly equal lengths: where the plan may keep every request whole
        s = int(rng.integers(1, 20000)) + rng.integers(-PAGE_SIZE * int(rng.integers(0, 4)), 1, batch)
    return np.maximum(s, 0).astype(np.int32)


def test_random_batches_satisfy_invariants():
    rng = np.random.default_rng(2024)
    for _ in range(3000):
        batch = int(rng.integers(1, 301))
        num_parts = int(rng.integers(1, 133))
        seqlens = random_seqlens(rng, batch)
        check_plan(seqlens, num_parts, *plan_numpy(seqlens, num_parts))


@pytest.mark.parametrize("batch", [1024, 8193, 65536])
def test_large_batches(batch):
    rng = np.random.default_rng(batch)
    for num_parts in (1, 7, 132):
        seqlens = random_seqlens(rng, batch)
        check_plan(seqlens, num_parts, *plan_numpy(seqlens, num_parts))


def test_int32_extremes_do_not_overflow():
    # 65536 requests of 2^31 - 1 tokens: the total cost exceeds int32, the plan must not.
    seqlens = np.full(65536, 2**31 - 1, dtype=np.int32)
    metadata, num_splits = plan_numpy(seqlens, 132)
    check_plan(seqlens, 132, metadata, num_splits)


def test_handmade_example():
    # pages [2, 0, 79, 1, 2]; total = 84 + 5 * 5 = 109; payload = ceil(109 / 4) + 5 = 33.
    # Part 0: request 0 (7) and 1 (5) fit, 21 left: cuts request 2 after 16 pages.
    # Parts 1 and 2: 28 more pages of request 2 each. Part 3: its last 7 pages, then requests 3 and 4.
    metadata, num_splits = plan_numpy(np.array([100, 0, 5000, 64, 65]), 4)
    assert metadata.tolist() == [
        [0, 0, 2, 16, 0, 33, 0, 0],
        [2, 16, 2, 44, 1, 33, 0, 0],
        [2, 44, 2, 72, 2, 33, 0, 0],
        [2, 72, 4, 2, 3, 33, 0, 0],
    ]
    assert num_splits.tolist() == [0, 1, 2, 6, 7, 8]


def test_one_long_request_is_cut_evenly():
    # 1024 pages over 4 parts: payload = ceil(1029 / 4) + 5 = 263, so pieces of 258, 258, 258, 250.
    metadata, num_splits = plan_numpy(np.array([1024 * PAGE_SIZE]), 4)
    assert metadata[:, [META_BEGIN_PAGE, META_END_PAGE, META_BEGIN_PIECE]].tolist() == [
        [0, 258, 0], [258, 516, 1], [516, 774, 2], [774, 1024, 3]]
    assert num_splits.tolist() == [0, 4]


def test_more_parts_than_work_leaves_trailing_parts_empty():
    metadata, num_splits = plan_numpy(np.array([1, 1]), 8)
    # total 12, payload ceil(12 / 8) + 5 = 7: one request per part.
    assert metadata.tolist()[:2] == [[0, 0, 0, 1, 0, 7, 0, 0], [1, 0, 1, 1, 0, 7, 0, 0]]
    assert all(row == [2, 0, 2, 0, 0, 7, 0, 0] for row in metadata.tolist()[2:])
    assert num_splits.tolist() == [0, 1, 2]


def test_zero_length_requests_get_one_empty_piece():
    metadata, num_splits = plan_numpy(np.zeros(3, dtype=np.int32), 2)
    assert num_splits.tolist() == [0, 1, 2, 3]
    # total 15, payload 8 + 5 = 13: requests 0 and 1 (5 each) in part 0, request 2 in part 1.
    assert metadata.tolist() == [[0, 0, 1, 0, 0, 13, 0, 0], [2, 0, 2, 0, 0, 13, 0, 0]]


def test_part_that_cannot_afford_a_page_ends_before_the_next_request():
    # pages [4, 4, 31]; total 54, P = 3: payload 18 + 5 = 23 (uncut it would need 36 > 110 % of it).
    # Part 0 takes requests 0 and 1 (18), leaving 5 <= OVERHEAD: it stops without cutting request 2,
    # which parts 1 and 2 then share.
    metadata, num_splits = plan_numpy(np.array([256, 256, 1984]), 3)
    assert metadata.tolist() == [
        [0, 0, 1, 4, 0, 23, 0, 0],
        [2, 0, 2, 18, 0, 23, 0, 0],
        [2, 18, 2, 31, 1, 23, 0, 0],
    ]
    assert num_splits.tolist() == [0, 1, 2, 4]


def test_equal_requests_stay_whole_where_cutting_buys_little():
    # 128 requests of 256 pages over 132 parts: cut, the payload would be ceil(128 * 261 / 132) + 5 =
    # 259 and every request would be cut; uncut it is 261 (0.8 % more): one request a part, 4 parts idle.
    metadata, num_splits = plan_numpy(np.full(128, 16384), 132)
    assert num_splits.tolist() == list(range(129))
    assert metadata[:128].tolist() == [[r, 0, r, 256, 0, 261, 0, 0] for r in range(128)]
    assert all(row == [128, 0, 128, 0, 0, 261, 0, 0] for row in metadata[128:].tolist())
    # 64 requests over 66 parts (two row tiles): the same, 2 parts idle.
    metadata, num_splits = plan_numpy(np.full(64, 16384), 66)
    assert num_splits.tolist() == list(range(65)) and metadata[0, META_PAYLOAD] == 261
    # 128 requests over 66 parts: two whole a part would do, but more requests than parts keep their cuts.
    _, num_splits = plan_numpy(np.full(128, 8192), 66)
    assert num_splits[-1] > 128
    # 116 of 132: uncut costs 261 against ceil(116 * 261 / 132) + 5 = 235 (11 % more): cut as before.
    _, num_splits = plan_numpy(np.full(116, 16384), 132)
    assert num_splits[-1] > 116


def test_unequal_requests_are_cut_as_before(monkeypatch):
    # One request three times the others: uncut it would set the payload; the plan cuts instead.
    seqlens = np.array([16384] * 127 + [3 * 16384])
    _, _, whole = plan_cost(seqlens, 132)
    assert not whole
    assert plan_numpy(seqlens, 132)[1][-1] > 128
    # WHOLE_SLACK_PERCENT < 0 turns the rule off: equal requests are cut to fill every part.
    import flashmla_cupy.plan as plan
    monkeypatch.setattr(plan, "WHOLE_SLACK_PERCENT", -1)
    metadata, num_splits = plan_numpy(np.full(128, 16384), 132)
    assert num_splits[-1] > 128 and metadata[0, META_PAYLOAD] == 259


def test_single_part_takes_everything_uncut():
    seqlens = np.array([0, 5, 70000, 64])
    metadata, num_splits = plan_numpy(seqlens, 1)
    assert metadata.tolist() == [[0, 0, 3, 1, 0, 1121, 0, 0]]
    assert num_splits.tolist() == [0, 1, 2, 3, 4]


def test_negative_lengths_count_as_empty():
    metadata, num_splits = plan_numpy(np.array([-5, 64]), 1)
    assert metadata.tolist() == [[0, 0, 1, 1, 0, 16, 0, 0]]
    assert num_splits.tolist() == [0, 1, 2]


def test_num_sm_parts():
    assert num_sm_parts(132, 1, 1) == 132
    assert num_sm_parts(132, 1, 64) == 132
    assert num_sm_parts(132, 1, 65) == 66     # two row tiles per part
    assert num_sm_parts(132, 1, 256) == 33
    assert num_sm_parts(132, 2, 64) == 66
    assert num_sm_parts(132, 128, 256) == 1   # never below one part


def test_partial_slots_covers_every_plan():
    """The workspace holds partial_slots(b, P) pieces: no plan makes more (random batches), and the
    worst plan, one long request cut at every part boundary, makes b + P - 1."""
    rng = np.random.default_rng(99)
    for _ in range(2000):
        batch, num_parts = int(rng.integers(1, 200)), int(rng.integers(1, 133))
        _, num_splits = plan_numpy(random_seqlens(rng, batch), num_parts)
        assert num_splits[-1] <= partial_slots(batch, num_parts)
    for batch, num_parts in [(1, 132), (3, 8), (64, 132), (2, 2)]:
        _, num_splits = plan_numpy(np.array([2**31 - 1] + [64] * (batch - 1)), num_parts)
        assert num_splits[-1] == batch + num_parts - 1 < partial_slots(batch, num_parts)


def test_rejects_zero_parts():
    with pytest.raises(ValueError):
        plan_numpy(np.array([1]), 0)


def test_capped_plans_for_the_gpu_tests_and_scripts_come_back_as_shipped():
    """devtools/gpu_cases.cap_plan_parts, which the long-part GPU tests, sanitize_cases and kernel_ab's
    `maxparts=` use: the part count capped, capping twice does not stack, None restores the planner."""
    from flashmla_cupy import lookup, plan
    from gpu_cases import cap_plan_parts

    shipped = plan.num_sm_parts
    lookup.remembered()["sentinel"] = object()
    try:
        cap_plan_parts(8)
        assert plan.num_sm_parts(132, 1, 128) == 8 and "sentinel" not in lookup.remembered()
        cap_plan_parts(100)
        assert plan.num_sm_parts(132, 1, 128) == min(100, shipped(132, 1, 128))
    finally:
        cap_plan_parts(None)
    assert plan.num_sm_parts is shipped
