"""The cloud overflow pool: tensor-parallel MiniLM replicas taking offloaded requests.

Requests arrive on the broker's shared subscription (``protocol.topics.Topics.pool_requests``)
from edges and from the controller's ``POST /api/v1/embed``; each replica is a group of TP ranks
(:mod:`replica`, :mod:`tensor_parallel`) whose rank 0 batches, answers and acknowledges; the
supervisor (:mod:`supervisor`) restarts replicas through an orchestrator (:mod:`orchestrator`,
:mod:`kubernetes`) and publishes the back-pressure signal (:mod:`backpressure`).

Re-exported here: what imports without torch. ``tensor_parallel`` and ``replica`` need torch and
are imported by name; ``kubernetes`` needs the ``kubernetes`` client.
"""

from cloud_controller.pool.answered import AnsweredStore
from cloud_controller.pool.backpressure import ReplicaLoad, pool_status
from cloud_controller.pool.gateway import (
    EmbedIn,
    EmbedOut,
    PoolClient,
    PoolError,
    PoolFailed,
    PoolRejected,
    PoolTimeout,
    PoolUnavailable,
    pool_router,
)
from cloud_controller.pool.orchestrator import (
    LocalProcessOrchestrator,
    Orchestrator,
    OrchestratorError,
    desired_replicas,
)
from cloud_controller.pool.settings import PoolSettings
from cloud_controller.pool.supervisor import PoolSupervisor

__all__ = [
    "AnsweredStore",
    "EmbedIn",
    "EmbedOut",
    "LocalProcessOrchestrator",
    "Orchestrator",
    "OrchestratorError",
    "PoolClient",
    "PoolError",
    "PoolFailed",
    "PoolRejected",
    "PoolSettings",
    "PoolSupervisor",
    "PoolTimeout",
    "PoolUnavailable",
    "ReplicaLoad",
    "desired_replicas",
    "pool_router",
    "pool_status",
]
