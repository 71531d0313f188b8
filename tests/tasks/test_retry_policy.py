"""Which shard-task errors are retried, and what the failure message asks of the user."""

from __future__ import annotations

import pytest
import torch
import zarr

from attriflow.explainers import ExplainerParamError, LayerNotFoundError
from attriflow.tasks.runtime import InjectedFault, InjectedInputError, is_deterministic


def _raised(make):
    try:
        make()
    except BaseException as err:  # noqa: BLE001
        return err
    raise AssertionError("nothing raised")


def _wrapped(inner: BaseException, outer: type[BaseException], hide: bool) -> BaseException:
    def go():
        try:
            raise inner
        except BaseException:
            if hide:
                raise outer("wrapped") from None
            raise outer("wrapped")  # noqa: B904 - the implicit context is what is tested
    return _raised(go)


@pytest.mark.parametrize("exc, deterministic", [
    (ValueError("bad parameter"), True),
    (ExplainerParamError("window too large"), True),
    (LayerNotFoundError("block9"), True),
    (TypeError("wrong type"), True),
    (InjectedInputError("x"), True),
    (InjectedFault("x"), False),  # a RuntimeError: may pass
    (RuntimeError("worker lost"), False),
    (OSError("network file system"), False),
    (MemoryError(), False),
    (torch.OutOfMemoryError("CUDA out of memory"), False),
    (None, False),
])
def test_errors_a_retry_would_repeat(exc, deterministic) -> None:
    assert is_deterministic(exc) is deterministic


def test_a_transient_error_anywhere_in_the_chain_is_retried() -> None:
    # a loader's ValueError wrapping an OSError (also `from None`): the read may pass next time
    assert not is_deterministic(_wrapped(OSError("stale handle"), ValueError, hide=True))
    assert not is_deterministic(_wrapped(MemoryError(), ValueError, hide=False))
    # a RuntimeError raised while handling a ValueError: the ValueError decides
    assert is_deterministic(_wrapped(ValueError("bad shape"), RuntimeError, hide=False))
    # zarr's "not found" errors are OSErrors too (a remote store's hiccup)
    assert not is_deterministic(zarr.errors.ArrayNotFoundError("a"))


def test_the_failure_message_says_what_helps() -> None:
    from attriflow.flows.run import failure_message

    message = failure_message([("explain a shard 0 (Failed: ValueError)", "deterministic"),
                               ("explain b shard 1 (Failed: OSError)", "transient"),
                               ("load shard 2 (Crashed)", "lost"),
                               ("evaluate b shard 1 (NotReady)", "upstream")], retries=0)
    assert message.startswith("4 shard task(s) did not finish; finished shards are kept. ")
    assert "1 failed with an error that a rerun would repeat (not retried): fix its cause, then run the same " \
           "command: explain a shard 0" in message
    assert "1 failed (runner.retries: 0); rerun to finish: explain b shard 1" in message
    assert "1 crashed, were cancelled or lost their worker; rerun to finish: load shard 2" in message
    assert "1 not run because a task they wait for did not finish: evaluate b shard 1" in message
    only = failure_message([("explain a shard 0 (Failed)", "transient")], retries=1)
    assert "after 1 retry; rerun to finish" in only and "fix its cause" not in only
