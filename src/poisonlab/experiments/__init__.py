"""Experiments: config schema and the runner."""

from poisonlab.experiments.config import ExperimentConfig, load_config, parse_config
from poisonlab.experiments.runner import run_experiment

__all__ = ["ExperimentConfig", "load_config", "parse_config", "run_experiment"]
