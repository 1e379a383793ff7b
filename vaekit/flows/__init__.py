"""Normalizing flows: the shared base (`base.py`), planar and Sylvester steps for amortized
posteriors, IAF with its MADE networks, and RealNVP coupling layers for the flow prior.

`vaekit.flows` re-exports what the single module of that name offered before it became a
package, so code and old run directories that import from it keep working.
"""

from vaekit.flows.base import (
    MAX_RECORDS,
    SOLVER_STEPS,
    FlowDistribution,
    TransformModule,
    forward_and_log_det,
    rows,
    solve_increasing,
)
from vaekit.flows.iaf import GATE_BIAS, MADE, AffineAutoregressive, ConditionalAffineAutoregressive
from vaekit.flows.planar import PLANAR_MARGIN, PLANAR_SHIFT, PlanarTransform
from vaekit.flows.realnvp import AffineCoupling, real_nvp
from vaekit.flows.sylvester import (
    FAST_STEPS,
    SYLVESTER_DIAGONAL_BOUND,
    SylvesterTransform,
    householder_product,
    orthogonalize,
    permutation_matrix,
    sylvester_triangular,
)

__all__ = [
    "FAST_STEPS",
    "GATE_BIAS",
    "MADE",
    "MAX_RECORDS",
    "PLANAR_MARGIN",
    "PLANAR_SHIFT",
    "SOLVER_STEPS",
    "SYLVESTER_DIAGONAL_BOUND",
    "AffineAutoregressive",
    "AffineCoupling",
    "ConditionalAffineAutoregressive",
    "FlowDistribution",
    "PlanarTransform",
    "SylvesterTransform",
    "TransformModule",
    "forward_and_log_det",
    "householder_product",
    "orthogonalize",
    "permutation_matrix",
    "real_nvp",
    "rows",
    "solve_increasing",
    "sylvester_triangular",
]
