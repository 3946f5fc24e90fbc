"""Search pipelines for the best accuracy/latency/size trade-off (``graphopt explore``)."""

from graphopt.exploration.search import Candidate, CandidateResult, ExploreResult, default_candidates, explore

__all__ = ["explore", "Candidate", "CandidateResult", "ExploreResult", "default_candidates"]
