"""The split-KV work plan: how the decode work of a batch is cut into one contiguous run per SM part.

Cost model. A request of `n` cached tokens costs `ceil(n / PAGE_SIZE)` pages of work, plus a fixed
`OVERHEAD_PAGES` for every piece it is cut into (loading the query tile, the epilogue, and for a cut
request the partial write-out and its share of the combine kernel). The batch's cost with no cuts is
`total = sum(pages_i + OVERHEAD_PAGES)`; each of the `P` parts is given `payload = ceil(total / P) +
OVERHEAD_PAGES`, one overhead more than a fair share so that a part can afford to cut the request it
ends on. Parts are filled in order: a part takes whole requests while they fit and otherwise cuts the
current request, so a request is split only where a part boundary falls inside it.

`plan_numpy` is the executable definition. `kernels_src/scheduler.cu` runs the same algorithm on the
device (stream-ordered, graph-capturable) and must agree with it bit for bit, so both use integer
arithmetic only.

Why the last part always finishes the batch. Let the *remaining cost* be `sum(pages left + OVERHEAD)`
over the unfinished requests (initially `total`); each piece a part takes costs it `pages + OVERHEAD`
of budget. Consider a part that stops with requests left. If it cut a request, it spent exactly its
`payload`, and all of that reduced the remaining cost except the cut piece's OVERHEAD (that request is
still unfinished and keeps its own): a reduction of `payload - OVERHEAD`. If it stopped without a
cut, it had no page left to spend (`budget <= OVERHEAD`), so it spent at least `payload - OVERHEAD`,
all of it on finished requests. Either way the remaining cost fell by at least `payload - OVERHEAD =
ceil(total / P)`. If all `P` parts stopped early, the remaining cost would be `<= total - P *
ceil(total / P) <= 0`, yet an unfinished request has remaining cost `>= OVERHEAD > 0`: impossible.

Whole requests where cutting buys little. Each of the `P` parts is a CTA on its own SM, so cutting
requests to give every part the same share saves at most the idle SMs' share of the time, while every
cut costs its partial rows (written, then read back by the combine kernel) and the combine's work after
the decode. Where the batch has no more requests than parts and the costliest of them is at most
`WHOLE_SLACK_PERCENT` above the payload, the plan keeps every request whole: the payload rises to that
request's cost `max_i pages_i + OVERHEAD_PAGES` where it is lower, a part that cannot take the next
request whole ends before it, and since a fresh part always can, each part takes at least one request
and `batch <= P` parts suffice. On the H200 (docs/PERF_NOTES.md, thirty-fifth and thirty-sixth
sessions) batches of 120-128 equal 16k requests were 2-7 % faster whole over 132 parts, memory- and
compute-bound (64 over 66 parts) alike. Batches of unequal lengths keep their cuts (their costliest
request is far above the payload), and so do batches of more requests than parts: two whole requests a
part (64 of 66 parts, 128 rows) were slower with FP8 caches and, with 16-bit ones, faster at 8k but
not reproducibly elsewhere.

Why pieces <= batch + P - 1. Every request has one piece plus one per cut inside it, and each cut ends
a part. The last part never ends on a cut (a cut leaves its request unfinished, and the last part
finishes the batch), so there are at most `P - 1` cuts.
"""
from __future__ import annotations

import numpy as np

from .params import (
    META_BEGIN_PAGE,
    META_BEGIN_PIECE,
    META_BEGIN_REQUEST,
    META_END_PAGE,
    META_END_REQUEST,
    META_PAYLOAD,
    METADATA_FIELDS,
)

PAGE_SIZE = 64        # tokens per KV-cache page (the FlashMLA contract)
OVERHEAD_PAGES = 5    # fixed cost of one piece, in pages of work (FP8 too: 3, 8 and 12 measured no better)
WHOLE_SLACK_PERCENT = 10  # uncut plans up to this much costlier (module docstring); negative: never
TILE_ROWS = 64        # query rows per CTA: the M of one warpgroup's wgmma
INT32_MAX = 2**31 - 1  # metadata is int32


def num_sm_parts(sm_count: int, heads_kv: int, rows: int) -> int:
    """How many parts the plan cuts the batch into.

    The decode grid is `(row_tiles, heads_kv, parts)` with `row_tiles = ceil(rows / TILE_ROWS)`, so
    this many parts make about one CTA per SM. `rows = seqlen_q * heads_q // heads_kv` is the number
    of query rows per KV head (FlashMLA's `num_q_tokens_per_head_k`).
    """
    row_tiles = -(-rows // TILE_ROWS)
    return max(1, sm_count // heads_kv // row_tiles)


def partial_slots(batch: int, num_parts: int) -> int:
    """Capacity, in pieces, of the partial-result buffers: the plan never makes more than
    `batch + num_parts - 1` pieces (see the module docstring)."""
    return batch + num_parts


def _pages(seqlen: int) -> int:
    """Pages of one request; a negative length (invalid input) counts as empty, as on the device."""
    return -(-max(int(seqlen), 0) // PAGE_SIZE)


def plan_numpy(seqlens: np.ndarray, num_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan for `seqlens` (int, [batch]) over `num_parts` parts.

    Returns `(metadata int32 [num_parts, METADATA_FIELDS], num_splits int32 [batch + 1])`. A metadata
    row is `[begin_request, begin_page, end_request (inclusive), end_page (exclusive), begin_piece,
    payload, 0, 0]`; a part that gets no work has `begin_request = end_request = batch`, the payload,
    and zeros elsewhere. The payload (every part's budget, in pages of work, capped at 2^31 - 1) is in
    every row for the decode kernels, which choose their L2 policy by it (kernels_src/load.cuh).
    `num_splits` is the prefix sum of the number of pieces of each request; a zero-length request
    still gets one (empty) piece, so that its rows are written as out = 0, lse = +inf.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    pages = [_pages(s) for s in np.asarray(seqlens).reshape(-1)]
    batch = len(pages)
    _, payload, whole = _cost(pages, num_parts)

    metadata = np.zeros((num_parts, METADATA_FIELDS), dtype=np.int32)
    metadata[:, META_BEGIN_REQUEST] = batch
    metadata[:, META_END_REQUEST] = batch
    metadata[:, META_PAYLOAD] = min(payload, INT32_MAX)
    pieces = [0] * batch

    # Cursor: request r, its next page p, and the index k of its next piece.
    r, p, k = 0, 0, 0
    for part in range(num_parts):
        if r == batch:
            break  # this and all later parts stay empty
        row = metadata[part]
        row[META_BEGIN_REQUEST], row[META_BEGIN_PAGE], row[META_BEGIN_PIECE] = r, p, k
        budget = payload
        while r < batch:
            rest = pages[r] - p
            if rest + OVERHEAD_PAGES <= budget:  # the rest of r fits: finish it
                budget -= rest + OVERHEAD_PAGES
                pieces[r] = k + 1
                row[META_END_REQUEST], row[META_END_PAGE] = r, pages[r]
                r, p, k = r + 1, 0, 0
                continue
            take = budget - OVERHEAD_PAGES
            if take > 0 and not whole:  # cut r: this part ends with its first `take` remaining pages
                row[META_END_REQUEST], row[META_END_PAGE] = r, p + take
                p, k = p + take, k + 1
            break
    assert r == batch, "plan left work unassigned (impossible: see the module docstring)"

    num_splits = np.zeros(batch + 1, dtype=np.int32)
    num_splits[1:] = np.cumsum(pieces, dtype=np.int64)
    return metadata, num_splits


def plan_cost(seqlens: np.ndarray, num_parts: int) -> tuple[int, int, bool]:
    """`(total, payload, whole)` of the cost model: the uncut batch cost, the budget of one part, and
    whether the plan keeps every request whole (module docstring)."""
    return _cost([_pages(s) for s in np.asarray(seqlens).reshape(-1)], num_parts)


def _cost(pages: list[int], num_parts: int) -> tuple[int, int, bool]:
    total = sum(pages) + OVERHEAD_PAGES * len(pages)
    payload = -(-total // num_parts) + OVERHEAD_PAGES
    costliest = max(pages, default=0) + OVERHEAD_PAGES
    whole = (WHOLE_SLACK_PERCENT >= 0 and len(pages) <= num_parts
             and 100 * costliest <= (100 + WHOLE_SLACK_PERCENT) * payload)
    return total, max(payload, costliest) if whole else payload, whole
