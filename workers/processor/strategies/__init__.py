"""Strategies: pure functions from a ServiceView (one service/operation's merged window
summaries) to Proposals, and the DecisionEngine that runs the enabled ones under a
DecisionPolicy. Each module answers one question: model_selection (a cheaper model as good),
caching (repeated prompts), rate_limiting (429s, bursts), batching (many small calls),
prompt_optimization (prompts far longer than peers')."""
from workers.processor.strategies.engine import DecisionEngine
from workers.processor.strategies.policy import DecisionPolicy, PolicyError
from workers.processor.strategies.proposal import Constraints, ExpectedImpact, Proposal
from workers.processor.strategies.view import InvalidHistory, ModelStats, ServiceView, build_views

__all__ = ["Constraints", "DecisionEngine", "DecisionPolicy", "ExpectedImpact",
           "InvalidHistory", "ModelStats", "PolicyError", "Proposal", "ServiceView",
           "build_views"]
