"""Every module that defines tables, imported in one place so ``SQLModel.metadata`` knows
them all (the migrations' env and the schema tests import this, not the modules one by one).
"""

from cloud_controller import audit, entities, policy_entities, rollout_entities
from cloud_controller.auth import tokens

__all__ = ["audit", "entities", "policy_entities", "rollout_entities", "tokens"]
