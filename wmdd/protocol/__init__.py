"""The one relabel + evaluation protocol, identical for every method: the soft-label protocol
(``soft``), the hard-label protocol (``hard``), one eval seed of a cell and the summary over
seeds (``runner``) and the teacher's verdict on a set (``diagnostics``). Nothing here knows
which method produced a set."""
