"""Visual-token pruners (configs only; the VLM host adapters do the cutting)."""
from .base import PrunerConfig, ScoreView
from .entropyprune import EntropyPrune
from .fastv import FastV
from .adaptinfer import AdaptInfer
from .random_prune import RandomPrune
from .vflowopt import VFlowOpt
from .zooprune import ZOOPrune

__all__ = ["PrunerConfig", "ScoreView", "FastV", "RandomPrune", "EntropyPrune", "AdaptInfer", "VFlowOpt", "ZOOPrune"]
