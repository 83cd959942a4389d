"""Experiments: config schema, grid planner, artifact cache, executors (local, Ray), results tables."""

from poisonlab.experiments.cache import ArtifactCache
from poisonlab.experiments.config import ExperimentConfig, load_config, parse_config
from poisonlab.experiments.plan import Plan, build_plan
from poisonlab.experiments.runner import plan_experiment, run_experiment

__all__ = ["ExperimentConfig", "load_config", "parse_config", "run_experiment", "plan_experiment", "build_plan",
           "Plan", "ArtifactCache"]
