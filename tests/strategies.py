"""Hypothesis strategies for shapes, dtypes and layouts (docs/numerics.md)."""
from hypothesis import strategies as st

#: odd sizes that break tiling assumptions, mixed with a few ordinary ones
ODD = st.sampled_from([1, 2, 7, 29, 97])
SMALL = st.sampled_from([1, 2, 3, 7, 13, 29])
DIMS = st.sampled_from([16, 24, 48, 64, 80, 96, 128])
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
CONTIGUOUS = st.booleans()


def sizes(lo: int = 1, hi: int = 97):
    return st.one_of(st.sampled_from([s for s in (1, 7, 29, 97, 1000) if lo <= s <= hi]),
                     st.integers(min_value=lo, max_value=hi))
