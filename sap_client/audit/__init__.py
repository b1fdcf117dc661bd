"""The curious provider's attacks, for the privacy audit: embedding inversion and attribute inference.

Empirical privacy = 1 - attack success rate (DESIGN section 4). Torch only: no gRPC here.
"""

from sap_client.audit.attribute import attribute_inference, mean_pool
from sap_client.audit.inversion import (
    average_observations,
    bottom_from_embeddings,
    nearest_neighbour_inversion,
    optimization_inversion,
    position_aware_inversion,
    token_recovery,
)

__all__ = [
    "attribute_inference",
    "average_observations",
    "bottom_from_embeddings",
    "mean_pool",
    "nearest_neighbour_inversion",
    "optimization_inversion",
    "position_aware_inversion",
    "token_recovery",
]
