"""The benchmark's cases: issue 7's table and docs/API.md section 7's standard matrix, in every dtype.

A case's id describes its shape completely, so any id parses and `--cases` also takes shapes outside
the two sets: `b128-q2-h64-4096-var-causal` is batch 128, 2 query tokens, 64 query heads, mean cache
length 4096, lengths varying per request, causal; `-kv2` would mark 2 KV heads (1 when absent).
The dtype is not part of the id: bf16 and fp16 runs of one shape see the same lengths.

No GPU and no torch here: `scripts/bench.py --list` and the CPU tests use this module alone.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
import zlib

import numpy as np

from flashmla_cupy.reference import HEAD_DIM_V, PAGE_SIZE, perf_accounting

# Bytes per element of q and the cache. "fp8" (issue 10) is FlashMLA's FP8 decode: q and cache in e4m3
# with per-tensor descales, out in bf16 (2 bytes: Case.accounting adds them).
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp8": 1}
OUT_ITEMSIZE = 2
DTYPES = tuple(ITEMSIZE)

# At most this many query rows per KV head fill one row tile: the kernel streams the cache
# (memory-bound, judged in GB/s); more rows make it compute-bound (judged in TFLOPS).
MEMORY_BOUND_ROWS = 64

# Issue 7's table, in its order: (batch, seqlen_q, heads_q, seqlen, causal), one KV head, fixed lengths.
ISSUE_TABLE = (
    (128, 1, 128, 4096, False),
    (32, 1, 128, 8192, False),
    (64, 1, 128, 1024, False),
    (16, 1, 128, 2048, False),
    (1, 1, 128, 32768, False),
    (128, 2, 128, 8192, True),
    (128, 2, 64, 4096, True),
    (128, 1, 64, 16384, False),
    (128, 1, 16, 4096, False),
    (128, 1, 32, 8192, False),
    (8, 1, 16, 16384, False),
)

# docs/API.md section 7: b = 128, one KV head, causal whenever s_q > 1 (causal changes nothing at s_q = 1).
MATRIX_BATCH = 128
MATRIX_SEQLEN_Q = (1, 2)
MATRIX_HEADS_Q = (16, 32, 64, 128)
MATRIX_SEQLENS = (1024, 4096, 8192, 16384)

_ID = re.compile(r"b(\d+)-q(\d+)-h(\d+)-(\d+)(?:-kv(\d+))?(-var)?(-causal)?")


def memory_bound(seqlen_q: int, heads_q: int, heads_kv: int) -> bool:
    return seqlen_q * heads_q // heads_kv <= MEMORY_BOUND_ROWS


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seqlen_q: int
    heads_q: int
    seqlen: int                 # every request's length, or their mean with varlen
    heads_kv: int = 1
    varlen: bool = False
    causal: bool = False
    dtype: str = "bf16"

    @property
    def id(self) -> str:
        kv = f"-kv{self.heads_kv}" if self.heads_kv != 1 else ""
        return (f"b{self.batch}-q{self.seqlen_q}-h{self.heads_q}-{self.seqlen}{kv}"
                f"{'-var' if self.varlen else ''}{'-causal' if self.causal else ''}")

    @property
    def label(self) -> str:
        return f"{self.dtype} {self.id}"

    @property
    def memory_bound(self) -> bool:
        return memory_bound(self.seqlen_q, self.heads_q, self.heads_kv)

    def seqlens(self) -> list[int]:
        """Cache lengths per request. Variable lengths are FlashMLA's benchmark distribution, normal with
        sd = mean / 2, at least s_q, drawn from a seed made of the id: the same in every run and dtype."""
        if not self.varlen:
            return [self.seqlen] * self.batch
        rng = np.random.default_rng(zlib.crc32(self.id.encode()))
        drawn = rng.normal(self.seqlen, self.seqlen / 2, self.batch)
        return [int(n) for n in np.maximum(drawn, self.seqlen_q)]

    def pages(self) -> list[int]:
        return [-(-n // PAGE_SIZE) for n in self.seqlens()]

    def accounting(self) -> tuple[int, int]:
        """(FLOPs, bytes) of one call, docs/API.md section 7."""
        flops, nbytes = perf_accounting(sum(self.seqlens()), self.batch, self.seqlen_q, self.heads_q,
                                        self.heads_kv, ITEMSIZE[self.dtype])
        # perf_accounting counts out in the input's element size; an FP8 call writes bf16.
        out_elements = self.batch * self.seqlen_q * self.heads_q * HEAD_DIM_V
        return flops, nbytes + out_elements * (OUT_ITEMSIZE - ITEMSIZE[self.dtype])


def parse(case_id: str, dtype: str = "bf16") -> Case:
    match = _ID.fullmatch(case_id)
    if match is None:
        raise ValueError(f"{case_id!r} is not a case id (like b128-q2-h64-4096-var-causal)")
    b, s_q, h_q, seqlen, h_kv, var, causal = match.groups()
    return Case(int(b), int(s_q), int(h_q), int(seqlen), int(h_kv or 1), bool(var), bool(causal), dtype)


def issue_shapes() -> list[Case]:
    return [Case(b, s_q, h_q, n, causal=causal) for b, s_q, h_q, n, causal in ISSUE_TABLE]


def matrix_shapes() -> list[Case]:
    return [Case(MATRIX_BATCH, s_q, h_q, n, varlen=varlen, causal=s_q > 1)
            for s_q in MATRIX_SEQLEN_Q for h_q in MATRIX_HEADS_Q for n in MATRIX_SEQLENS for varlen in (False, True)]


GROUPS = {"issue": issue_shapes, "matrix": matrix_shapes}


def groups_of(case: Case) -> list[str]:
    """The named sets a shape belongs to (none for an ad-hoc id)."""
    shape = dataclasses.replace(case, dtype="bf16")
    return [name for name, shapes in GROUPS.items() if shape in shapes()]


def select(spec: str, dtypes: list[str]) -> list[Case]:
    """The cases a `--cases` value names, each in every dtype, without repeats.

    `spec` is comma-separated: `issue`, `matrix`, `all` (both), shell patterns over the ids of both sets
    (`b128-q2-*`), or any id. Named sets run set by set and, within a set, dtype by dtype, so a run cut
    short has issue 7's table complete in both dtypes before the matrix starts."""
    unknown = [d for d in dtypes if d not in ITEMSIZE]
    if unknown or not dtypes:
        raise ValueError(f"dtype {', '.join(unknown) or '(none)'}: choose from {', '.join(DTYPES)}")
    known = [shape for make in GROUPS.values() for shape in make()]
    blocks: list[list[Case]] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token == "all":
            blocks += [make() for make in GROUPS.values()]
        elif token in GROUPS:
            blocks.append(GROUPS[token]())
        elif any(c in token for c in "*?["):
            matched = [shape for shape in known if fnmatch.fnmatchcase(shape.id, token)]
            if not matched:
                raise ValueError(f"--cases pattern {token!r} matches no case of {', '.join(GROUPS)}")
            blocks.append(matched)
        else:
            blocks.append([parse(token)])
    cases: list[Case] = []
    for shapes in blocks:
        for dtype in dtypes:
            cases += [dataclasses.replace(s, dtype=dtype) for s in shapes]
    return list(dict.fromkeys(cases))
