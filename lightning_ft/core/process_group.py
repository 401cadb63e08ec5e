"""Destroying the default process group when a distributed process exits.

Lightning registers ``torch.distributed.destroy_process_group`` at exit only for NCCL. A gloo (CPU) process that
exits with its group still alive lets the interpreter's teardown destroy gloo's threads in no fixed order, and now
and then a rank dies with ``terminate called without an active exception`` (SIGABRT) after a run that finished:
``ddp_spawn`` then raises ``ProcessExitedException`` in the main process. Destroying the group before the
interpreter's teardown removes most of that race for every backend; under gloo the ranks also meet in a barrier
(at most 30 s) before destroying it, so that no rank tears gloo down while a slower peer is still talking to it
(a rare abort remained without it).
"""

from __future__ import annotations

import atexit
import contextlib
from datetime import timedelta

import torch.distributed as dist

__all__ = ["destroy_process_group_at_exit"]

_registered = False
_EXIT_BARRIER_S = 30


def _destroy() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        # Every rank waits for the others to reach exit, so no rank tears gloo down while a peer still talks to it;
        # a peer that never arrives (it crashed) only delays this exit by the timeout.
        with contextlib.suppress(Exception):
            dist.monitored_barrier(timeout=timedelta(seconds=_EXIT_BARRIER_S))
    dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Make this process destroy its default process group, if it still has one, when the interpreter exits.

    Idempotent and cheap; :class:`~lightning_ft.modules.CausalLMModule`,
    :class:`~lightning_ft.modules.SequenceClassificationModule`, every method callback and
    :class:`~lightning_ft.copilot.CopilotMixin` call it in ``setup()`` (itself, not through the support check), so
    every rank of a Lightning DDP run (``ddp`` or ``ddp_spawn``) registers it, also when a callback runs in a user's
    own module. Call it from your own module's ``setup()`` when you run DDP on CPU without any of them.
    """
    global _registered
    if not _registered:
        atexit.register(_destroy)
        _registered = True
