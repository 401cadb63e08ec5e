"""Analysis callbacks that show what fine-tuning changed, logged through every logger and into the run folder."""

from lightning_ft.monitors.intruders import IntruderDimensions, effective_matrices, intruder_similarities

__all__ = ["IntruderDimensions", "effective_matrices", "intruder_similarities"]
