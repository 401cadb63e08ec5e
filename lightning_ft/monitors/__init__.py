"""Analysis callbacks that show what fine-tuning changed, logged through every logger and into the run folder, and
the run's dashboard (W&B panels, ``report.html``, ``lightning-ft compare``)."""

from lightning_ft.monitors.base import MonitorCallback
from lightning_ft.monitors.context_awareness import (
           ContextAwareness,
           annotate_indicator,
           append_indicator,
           user_attention_ratio,
)
from lightning_ft.monitors.dashboard import RunDashboard, collect_panels
from lightning_ft.monitors.forgetting_probes import ImplicitInferenceProbes, ProbeFormat, ProbeSet
from lightning_ft.monitors.intruders import IntruderDimensions, effective_matrices, intruder_similarities
from lightning_ft.monitors.panels import Panel
from lightning_ft.monitors.representation import RepresentationShift, linear_cka
from lightning_ft.monitors.steer import steer

__all__ = ["ContextAwareness", "ImplicitInferenceProbes", "IntruderDimensions", "MonitorCallback", "Panel", "ProbeFormat", "ProbeSet",
           "RepresentationShift", "RunDashboard", "annotate_indicator", "append_indicator", "collect_panels",
           "effective_matrices", "intruder_similarities", "linear_cka", "steer", "user_attention_ratio"]
