"""The deferred release: ``fused_clear_grads`` (``GradTable.clear``, behind ``zero_grad()``) hands
the gradients it drops to a background thread where destroying them needs no Python, and
destroys the others in the call. What a user sees must not change: ``p.grad`` is None at once,
a gradient someone still references keeps its values, a gradient with a Python object dies in the
call (a weak reference to it is dead when ``zero_grad()`` returns), the bytes waiting are capped,
and the process can fork and exit with work pending.

Gradients made by autograd (``torch.autograd.backward``) are C++ tensors without a Python object
until Python code reads ``p.grad``: the tests read them through ``GradTable.read`` (their
addresses) or only after clearing, so as not to attach one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest
import torch

from fused_core import gradients

LIB = gradients.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no gradient reader (no C++ compiler or torch headers)")
SIZE = 64


def leaves(count: int, size: int = SIZE) -> list[torch.Tensor]:
    return [torch.zeros(size, requires_grad=True) for _ in range(count)]


def backward(params: list[torch.Tensor], values: list[float] | None = None) -> None:
    """Autograd's gradients (C++ tensors without a Python object): ``values[i]`` everywhere in param i's."""
    values = values if values is not None else [float(i) for i in range(len(params))]
    torch.autograd.backward(params, [torch.full_like(p, value) for p, value in zip(params, values)])


def table(params: list[torch.Tensor]) -> gradients.GradTable:
    assert LIB is not None
    return gradients.GradTable(LIB, params, [p.data_ptr() for p in params])


@pytest.fixture(autouse=True)
def nothing_pending() -> None:
    """Each test starts, and leaves, with nothing waiting for the background thread."""
    gradients.wait_for_release()
    yield
    gradients.wait_for_release()
    assert gradients.release_pending()[:2] == (0, 0)


@pytest.fixture
def threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_autograd_gradients_go_to_the_background_and_are_none_at_once() -> None:
    params = leaves(3000)
    backward(params)
    handed_before = gradients.release_pending()[2]
    handed = table(params).clear()
    assert handed == len(params)
    assert all(p.grad is None for p in params)
    assert gradients.release_pending()[2] == handed_before + handed
    gradients.wait_for_release()
    assert gradients.release_pending()[:2] == (0, 0)
    backward(params)  # and the next gradients arrive as ever
    assert [float(p.grad[0]) for p in params[:3]] == [0.0, 1.0, 2.0]


def test_a_gradient_with_a_python_object_dies_in_the_call() -> None:
    assigned, read = leaves(50), leaves(50)
    for p in assigned:
        p.grad = torch.ones(SIZE)
    backward(read)
    refs = [weakref.ref(p.grad) for p in assigned + read]  # reading .grad attaches a Python object
    assert table(assigned + read).clear() == 0
    assert all(ref() is None for ref in refs)
    assert all(p.grad is None for p in assigned + read)


def test_a_held_gradient_stays_valid_and_unchanged() -> None:
    params = leaves(2000)
    backward(params)
    held = {i: params[i].grad for i in range(0, len(params), 3)}
    handed = table(params).clear()
    assert handed == len(params) - len(held)
    assert all(p.grad is None for p in params)
    gradients.wait_for_release()
    churn = [torch.full((SIZE,), -7.0) for _ in range(4000)]  # reuses whatever memory was freed
    for i, grad in held.items():
        assert torch.equal(grad, torch.full((SIZE,), float(i)))
        grad.add_(1.0)
        assert float(grad.sum()) == SIZE * (i + 1.0)
    assert all(float(c[0]) == -7.0 for c in churn)


def test_gradients_sharing_a_storage_are_dropped_in_the_call() -> None:
    a, b = leaves(2)
    upstream = torch.arange(2.0 * SIZE)
    torch.cat([a, b]).backward(upstream)  # CatBackward's slices are stolen: both grads view `upstream`
    tab = table([a, b])
    assert tab.read() == 0
    assert tab.ptrs.tolist() == [upstream.data_ptr(), upstream.data_ptr() + 4 * SIZE]
    assert tab.clear() == 0  # the storage is upstream's too
    assert torch.equal(upstream, torch.arange(2.0 * SIZE))

    torch.cat([a, b]).backward(torch.arange(2.0 * SIZE))
    # Only the gradients share the storage now: the first is dropped in the call, the second,
    # the last reference to it, may go to the background thread.
    assert table([a, b]).clear() == 1
    assert a.grad is None and b.grad is None


def test_the_bytes_waiting_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 256 << 10
    monkeypatch.setattr(gradients, "RELEASE_CAP_BYTES", cap)
    params = leaves(4000)  # ~2.4 MB of gradients, with their TensorImpls and storages
    backward(params)
    handed = table(params).clear()
    assert 0 < handed < len(params)
    assert handed * 4 * SIZE <= cap
    assert gradients.release_pending()[1] <= cap
    assert all(p.grad is None for p in params)


def test_no_cap_or_a_large_gradient_means_all_in_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    params = leaves(100)
    backward(params)
    monkeypatch.setattr(gradients, "RELEASE_CAP_BYTES", 0)
    assert table(params).clear() == 0
    monkeypatch.undo()
    big, small = leaves(1, 2 * gradients.RELEASE_MAX_TENSOR_BYTES // 4)[0], leaves(1)[0]
    backward([big, small])
    assert table([big, small]).clear() == 1
    assert big.grad is None and small.grad is None


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gradients.RELEASE_CAP_ENV, "0")
    assert gradients._release_cap() == 0
    monkeypatch.setenv(gradients.RELEASE_CAP_ENV, "8")
    assert gradients._release_cap() == 8 << 20
    monkeypatch.delenv(gradients.RELEASE_CAP_ENV)
    assert gradients._release_cap() == 64 << 20
    monkeypatch.setenv(gradients.RELEASE_CAP_ENV, "lots")
    with pytest.warns(UserWarning, match=gradients.RELEASE_CAP_ENV):
        assert gradients._release_cap() == 64 << 20


def test_the_memory_profiler_sees_every_free() -> None:
    params = leaves(100)
    backward(params)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True):
        assert table(params).clear() == 0
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_many_cycles_keep_every_held_gradient_intact(threads: int) -> None:
    params = leaves(1500)
    tab = table(params)
    kept: list[tuple[torch.Tensor, float]] = []
    for cycle in range(30):
        values = [float(cycle * 10_000 + i) for i in range(len(params))]
        backward(params, values)
        assert tab.read() == 0 and (tab.status == gradients.IN_PLACE).all()
        index = (cycle * 37) % len(params)
        kept.append((params[index].grad, values[index]))
        assert tab.clear() == len(params) - 1
        assert all(p.grad is None for p in params)
    gradients.wait_for_release()
    for grad, value in kept:
        assert torch.equal(grad, torch.full((SIZE,), value))


def test_python_threads_clearing_at_once_finish() -> None:
    errors: list[BaseException] = []

    def cycles() -> None:
        try:
            params = leaves(800)
            tab = table(params)
            for _ in range(40):
                backward(params)
                tab.clear()
                assert all(p.grad is None for p in params)
            gradients.wait_for_release()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    workers = [threading.Thread(target=cycles) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(worker.is_alive() for worker in workers), "a thread clearing gradients hangs"
    assert errors == []


def wait_for_child(pid: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child deadlocked")


def child(check) -> None:
    """Runs ``check`` in a forked child and leaves with its verdict, never back into pytest."""
    code = 1
    try:
        torch.set_num_threads(1)  # OpenMP's threads are not the child's
        code = 0 if check() else 2
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_fork_right_after_clearing_does_not_deadlock() -> None:
    params = leaves(20_000, 16)
    busy = 0
    for attempt in range(4):
        backward(params)
        assert table(params).clear() == len(params)
        busy += gradients.release_pending()[0] > 0
        pid = os.fork()  # while the background thread is destroying them
        if pid == 0:

            def check() -> bool:
                pending = gradients.release_pending()[0]
                waited = gradients.wait_for_release()  # the child has no reaper: destroyed here
                mine = leaves(2000)
                backward(mine)
                handed = table(mine).clear()  # starts the child's own reaper
                gradients.wait_for_release()
                return (
                    waited == pending
                    and handed == len(mine)
                    and gradients.release_pending()[:2] == (0, 0)
                    and all(p.grad is None for p in params + mine)
                )

            child(check)
        assert wait_for_child(pid) == 0, f"attempt {attempt}"
    assert busy > 0, "the background thread was never busy at a fork: nothing tested"
    gradients.wait_for_release()  # the parent's reaper goes on after the forks
    assert gradients.release_pending()[:2] == (0, 0)


SCRIPT = """
import sys, torch
from fused_core import gradients
params = [torch.zeros(16, requires_grad=True) for _ in range(60_000)]
torch.autograd.backward(params, [torch.ones(16)] * len(params))
handed = gradients.GradTable(gradients.library(), params, [p.data_ptr() for p in params]).clear()
print("handed", handed, "pending", gradients.release_pending()[0], flush=True)
{leave}
"""


@pytest.mark.parametrize(
    ("leave", "code"),
    [("pass", 0), ("sys.exit(3)", 3), ("raise RuntimeError('an uncaught error')", 1)],
    ids=["end-of-script", "sys.exit", "uncaught-error"],
)
def test_the_process_exits_with_work_pending(leave: str, code: int) -> None:
    env = {**os.environ, gradients.RELEASE_CAP_ENV: "512"}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT).format(leave=leave)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stdout.startswith("handed 60000"), done.stdout + done.stderr[-2000:]
