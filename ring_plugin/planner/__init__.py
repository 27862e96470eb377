"""``ring-plan``: predict per-GPU memory and step time of a ring-train job over candidate layouts
(data parallel x Ulysses x ring, ZeRO stage, activation checkpointing) and recommend the fastest that
fits. How the model works and how it was validated: docs/planner.md."""

from .app_config import compose
from .cluster import GPUS, Cluster, GPUKind, cluster
from .hf_models import LongestFit, longest_sequence, spec_from_hf_config
from .memory import MemoryEstimate, estimate_memory
from .model_states import States, state_bytes
from .rates import Rates
from .recipe_job import job_from_config
from .recommend import Candidate, Report, plan
from .step_time import StepTime, estimate_step
from .workload import Job, Layout, ModelSpec

__all__ = ["GPUS", "Candidate", "Cluster", "GPUKind", "Job", "Layout", "LongestFit", "MemoryEstimate", "ModelSpec",
           "Rates", "Report", "States", "StepTime", "cluster", "compose", "estimate_memory", "estimate_step",
           "job_from_config", "longest_sequence", "plan", "spec_from_hf_config", "state_bytes"]
