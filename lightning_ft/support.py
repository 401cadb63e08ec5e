"""The declared support matrix (public name; the code lives in :mod:`lightning_ft.core.support`)."""

from lightning_ft.core.support import (
    FEATURES,
    GENERIC,
    LEGACY_SHARDED,
    TABLE_BEGIN,
    TABLE_END,
    MethodSupport,
    check_strategy_support,
    check_support,
    declared_methods,
    legacy_refusal,
    render_table,
    sharded_refusal,
    strategy_class,
    support_of,
    used_features,
)
from lightning_ft.core.support import __getattr__ as __getattr__  # noqa: PLC0414 - SUPPORT, the read-only view

__all__ = [
    "FEATURES",
    "GENERIC",
    "LEGACY_SHARDED",
    "TABLE_BEGIN",
    "TABLE_END",
    "MethodSupport",
    "check_strategy_support",
    "check_support",
    "declared_methods",
    "legacy_refusal",
    "render_table",
    "sharded_refusal",
    "strategy_class",
    "support_of",
    "used_features",
]
