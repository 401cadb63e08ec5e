"""Example checkers for :class:`~lightning_ft.curation.faft.FeedbackAwareTargets` (FAFT): programmatic, per-constraint
pass/fail verdicts on one answer, as the TravelPlanner evaluator gives for a plan.

A checker is a function ``checker(answer, record) -> dict[str, bool]``: ``answer`` is the text after the prompt (a
sampled completion or the gold response), ``record`` the data record it answers; the keys name the constraints
(the same keys, in the same order, for every answer) and the values say whether the answer satisfies each. Give it
to FAFT as a ``module:function`` string, e.g. ``lightning_ft.curation.faft_checks:sentiment_format``.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

__all__ = ["SENTIMENT_LABELS", "sentiment_format"]

SENTIMENT_LABELS = ("positive", "negative")


def sentiment_format(answer: str, record: Mapping[str, Any] | None = None) -> dict[str, bool]:
    """Format constraints of a sentiment answer (Rotten Tomatoes' ``positive``/``negative``), whitespace stripped.

    ``one word``: a single word; ``label word``: the whole answer is one of :data:`SENTIMENT_LABELS` (in any case,
    punctuation around it ignored); ``lowercase``: no upper-case letter; ``no punctuation``: no punctuation
    character. Whether the label is the right one is not a format constraint and is not checked.
    """
    text = answer.strip()
    return {
        "one word": len(text.split()) == 1,
        "label word": text.lower().strip(string.punctuation + " ") in SENTIMENT_LABELS,
        "lowercase": text == text.lower(),
        "no punctuation": not any(c in string.punctuation for c in text),
    }
