"""The curious provider's attacks, for the privacy audit: embedding inversion (nearest neighbour, optimization,
sequential decoding, a learned inverter), attribute inference and label inference.

Empirical privacy = 1 - the success of the strongest attack that applies. Torch only: no gRPC here.
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
