"""Rank 0 drives, the other ranks follow: the engine under tensor parallelism.

Every rank must run every forward step, because the steps' collectives (the all-reduces and the
logits' all-gather) pair up across ranks; but only rank 0 tokenizes, schedules, samples and prints.
So rank 0 runs the engine as usual and, for each call that must run everywhere (a forward step),
:func:`call_on_every_rank` broadcasts the method's name and host arguments (the scheduler's
:class:`~infinilm_nb.runtime.batch.StepInput`) before running it itself, with the sampling parameters. Ranks > 0 sit in
:func:`follow`, running each broadcast call on their own engine, until rank 0 sends
:func:`stop_followers` (``LLM.close()``, or at rank 0's interpreter exit). Sampled tokens never travel:
only rank 0 samples, and the next step's broadcast carries them inside its token ids.

A failure inside a call that the followers are running too cannot be recovered (the ranks' collectives
no longer pair up), so it aborts the whole MPI job with its traceback instead of hanging.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from .distributed import CommunicationGroup, abort_job

STOP = None  # the message that ends :func:`follow`


@contextmanager
def fatal_on_any_rank(group: CommunicationGroup | None) -> Iterator[None]:
    """Under tensor parallelism, an error inside aborts the job (with its traceback) instead of being
    raised: for work that may fail on one rank alone (reading weights, sizing GPU memory), whose
    failure would leave the other ranks waiting in their next collective."""
    try:
        yield
    except BaseException as error:
        if group is None or group.world_size == 1:
            raise
        abort_job(group.info.rank, error)


def call_on_every_rank(group: CommunicationGroup | None, target: Any, method: str, *args: Any, **local: Any) -> Any:
    """Run ``target.method(*args, **local)`` here and, with a group of several ranks,
    ``target.method(*args)`` on every follower rank (called on rank 0). ``args`` are broadcast
    (picklable host objects); ``local`` keyword arguments are rank 0's alone (the sampling parameters).
    Returns this rank's result."""
    if group is not None and group.world_size > 1:
        group.broadcast_object((method, args))
    with fatal_on_any_rank(group):  # the followers are inside this call: nothing can pair with them now
        return getattr(target, method)(*args, **local)


def follow(group: CommunicationGroup, target: Any) -> None:
    """Ranks > 0: run each call that rank 0 broadcasts on ``target`` until it sends :data:`STOP`."""
    while True:
        message = group.broadcast_object(None)
        if message is STOP:
            return
        method, args = message
        with fatal_on_any_rank(group):
            getattr(target, method)(*args)


def stop_followers(group: CommunicationGroup) -> None:
    """Rank 0: end the followers' :func:`follow` loops."""
    group.broadcast_object(STOP)
