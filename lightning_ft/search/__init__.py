"""AutoPEFT (Zhou et al., TACL 2024, https://arxiv.org/abs/2301.12132): ``lightning-ft search``.

A multi-objective search (a validation metric vs the trainable parameters) of the PEFT configuration, with
low-fidelity trials that are ordinary ``lightning-ft fit`` runs and an optuna study that resumes. The space and its
mapping onto peft: :mod:`lightning_ft.search.space`; the loop: :mod:`lightning_ft.search.study`; the command:
:mod:`lightning_ft.search.cli`. optuna is imported only when a search runs (``pip install optuna``).
"""

from lightning_ft.search.front import FrontPoint, pareto_front
from lightning_ft.search.result import TrialResult
from lightning_ft.search.space import Dimension, SearchSpace, default_space, load_space

__all__ = ["Dimension", "FrontPoint", "SearchSpace", "TrialResult", "default_space", "load_space", "pareto_front"]
