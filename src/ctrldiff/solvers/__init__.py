"""Solvers of CTRL's KL-regularised RL step: one file each, the same call.

A solver is built once per run and called on every micro-batch of requests (c, y, noise seeds) that
the training loop draws:

    loss, terms = solver(model, c, y, seeds, probing)

``loss`` is back-propagated by the loop (accelerate's accumulation, clipping and mixed precision);
``terms`` are the on-policy rollout's per-trajectory terms (reward, KL), or None on updates where the
solver rolls nothing out. At ``probing`` updates every solver returns them, with the whole
trajectory KL, so that every solver's log reads the same objective.
"""

from ctrldiff.solvers.adjoint import Adjoint
from ctrldiff.solvers.backprop import Backprop
from ctrldiff.solvers.weighted import Weighted

SOLVERS = {"backprop": Backprop, "weighted": Weighted, "adjoint": Adjoint}

__all__ = ["SOLVERS", "Adjoint", "Backprop", "Weighted"]
