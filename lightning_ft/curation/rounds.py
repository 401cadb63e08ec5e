"""The ``state.json`` of the commands that run in rounds (kmq, SPIN, LiST, CGE): the settings a work folder was
started with and its finished rounds, replaced atomically after each round. A rerun with the same settings resumes
after the last finished round; other settings are refused in one sentence."""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from lightning_ft.core.io import write_text_atomic
from lightning_ft.errors import UserError

__all__ = ["STATE_VERSION", "load_rounds", "save_rounds", "settings_of"]

STATE_VERSION = 1


def settings_of(args: argparse.Namespace, skip: Collection[str] = ()) -> dict[str, Any]:
    """The command's options (paths as text) that a resumed run must share, all but ``skip``."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items()) if k not in skip}


def load_rounds(path: Path, settings: dict[str, Any], key: str = "rounds") -> list[dict[str, Any]]:
    """The finished rounds recorded under ``key`` in ``path`` (none if it does not exist yet).

    Raises:
        UserError: ``path`` was written with other settings (or another state version).
    """
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version") != STATE_VERSION or data.get("settings") != settings:
        changed = sorted(k for k in settings if data.get("settings", {}).get(k) != settings[k])
        raise UserError(f"--work-dir {path.parent} holds {key} of other settings ({', '.join(changed) or 'version'} "
                        "differ): rerun with the same options to resume, or give a new --work-dir.")  # fmt: skip
    return list(data[key])


def save_rounds(path: Path, settings: dict[str, Any], rounds: list[dict[str, Any]], key: str = "rounds") -> None:
    """Replace ``path`` atomically with the settings and the finished rounds."""
    write_text_atomic(path, json.dumps({"version": STATE_VERSION, "settings": settings, key: rounds}, indent=1) + "\n")
