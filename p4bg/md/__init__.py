"""Molecular dynamics that makes p4bg's reference data: plain MD, replica exchange and umbrella
sampling, each a kind of run on one resumable chunk loop (:mod:`p4bg.md.chunks`) that a worker
pool (:mod:`p4bg.md.pool`) runs in parallel processes, one replica, chain or window each. This
package owns the pool and the choice of OpenMM platform, the chunk loop and its resume, the three
kinds of run (:mod:`~p4bg.md.plain`, :mod:`~p4bg.md.exchange`, :mod:`~p4bg.md.umbrella`), the
record of a run in its dataset folder, and the pymbar free-energy estimators
(:mod:`p4bg.md.estimators`). The dataset format itself is :mod:`p4bg.data`'s; the command lines
are ``p4bg.simulate``, ``p4bg.remd`` and ``p4bg.umbrella``.
"""
