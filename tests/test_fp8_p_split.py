"""devtools/fp8_p_split.py: the register layout a P V on FP8 tensor cores would rely on (no GPU)."""
from __future__ import annotations

import fp8_p_split


def test_permuted_v_tokens_let_p_fragments_come_from_the_threads_own_scores():
    assert sorted(map(fp8_p_split.token_of_k_position, range(32))) == list(range(32))
    assert fp8_p_split.check_fragment_permutation()


def test_without_the_permutation_p_would_need_other_threads_scores(monkeypatch):
    monkeypatch.setattr(fp8_p_split, "token_of_k_position", lambda p: p)
    assert not fp8_p_split.check_fragment_permutation()
