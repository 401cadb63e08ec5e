"""Analysis callbacks that show what fine-tuning changed, logged through every logger and into the run folder."""

from lightning_ft.monitors.dashboard import RunDashboard, collect_panels
from lightning_ft.monitors.intruders import IntruderDimensions, effective_matrices, intruder_similarities
from lightning_ft.monitors.panels import Panel

__all__ = ["IntruderDimensions", "Panel", "RunDashboard", "collect_panels", "effective_matrices", "intruder_similarities"]
