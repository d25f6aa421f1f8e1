r"""Float64 oracles for any optimizer: the exact-math trajectory low-precision runs are measured against.

Two ways to get one, both computing in float64 on copies (the inputs are never modified):

* :class:`Float64Oracle` runs an optimizer class itself (typically the reference, e.g.
  ``torch.optim.SGD``) over float64 copies of the parameters. Nothing needs to be written by
  hand, so this is the generic oracle for any update torch (or anyone) already implements.
* :func:`oracle_step` applies an update function you write per parameter, from the math, in
  float64; :class:`UpdateOracle` keeps its parameters and state between steps. Use it where
  there is no trustworthy reference implementation, or to check the reference itself.

A per-parameter update function has the signature::

    def update(param: Tensor, grad: Tensor, state: dict[str, Tensor], **hyperparameters) -> Tensor:
        ...  # return the new parameter; read and assign state[...] as needed

``param`` and ``grad`` are float64 copies; ``state`` is this parameter's float64 state, empty
before its first step, kept by the caller between steps (assign new entries or replace old
ones; in-place updates of the tensors in it are fine too). For example, SGD with momentum::

    def sgd(param, grad, state, *, lr, momentum=0.0, weight_decay=0.0):
        grad = grad + weight_decay * param
        if momentum:
            buf = state.get("momentum_buffer")
            state["momentum_buffer"] = grad if buf is None else momentum * buf + grad
            grad = state["momentum_buffer"]
        return param - lr * grad

    params64 = [p.double() for p in params]
    states = [{} for _ in params]
    params64 = oracle_step(sgd, params64, grads, states, lr=0.1, momentum=0.9)   # one step

Parameters whose gradient is None are skipped, as torch.optim does: returned unchanged (as a
float64 copy), their state untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Float64Oracle", "UpdateFn", "UpdateOracle", "oracle_step"]

UpdateFn = Callable[..., Tensor]
"""``update(param, grad, state, **hyperparameters) -> new param``, all float64 (see the module docstring)."""


def _f64(tensor: Tensor) -> Tensor:
    """A detached float64 copy that never aliases ``tensor`` (strides kept)."""
    return tensor.detach().to(dtype=torch.float64, copy=True)


def oracle_step(
    update_fn: UpdateFn,
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    states: Sequence[dict[str, Any]],
    **hyperparameters: Any,
) -> list[Tensor]:
    """One step of ``update_fn`` over every parameter, in float64; returns the new float64 parameters.

    Args:
        update_fn: ``update(param, grad, state, **hyperparameters) -> new param``.
        params: the current parameters, any floating dtype (upcast to float64 copies).
        grads: one per parameter, any floating dtype; None skips the parameter.
        states: one dict per parameter, kept by the caller between steps (start with
            ``[{} for _ in params]``); ``update_fn`` reads and writes it.
        hyperparameters: passed to ``update_fn`` as keywords.
    """
    if not (len(params) == len(grads) == len(states)):
        raise ValueError(f"{len(params)} params, {len(grads)} grads and {len(states)} states: one each per parameter")
    updated = []
    with torch.no_grad():
        for index, (param, grad, state) in enumerate(zip(params, grads, states)):
            param64 = _f64(param)
            if grad is None:
                updated.append(param64)
                continue
            if grad.shape != param.shape:
                raise ValueError(
                    f"parameter {index}: gradient of shape {tuple(grad.shape)}, expected {tuple(param.shape)}"
                )
            new = update_fn(param64, _f64(grad), state, **hyperparameters)
            if not isinstance(new, Tensor) or new.shape != param.shape:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise TypeError(f"update_fn returned {got} for parameter {index}, expected a tensor of its shape")
            updated.append(new.to(torch.float64))
    return updated


class UpdateOracle:
    """:func:`oracle_step` with the parameters and states kept between steps.

    ``UpdateOracle(update_fn, params, **hyperparameters)`` copies ``params`` to float64;
    ``step(grads)`` advances them; ``params`` and ``states`` are the float64 results.
    """

    def __init__(self, update_fn: UpdateFn, params: Sequence[Tensor], **hyperparameters: Any) -> None:
        self.update_fn = update_fn
        self.hyperparameters = hyperparameters
        self.params = [_f64(param) for param in params]
        self.states: list[dict[str, Any]] = [{} for _ in self.params]

    def step(self, grads: Sequence[Tensor | None]) -> None:
        self.params = oracle_step(self.update_fn, self.params, grads, self.states, **self.hyperparameters)

    def state(self, index: int) -> dict[str, Any]:
        """The float64 state of parameter ``index`` (empty before its first step)."""
        return self.states[index]


class Float64Oracle:
    """An optimizer class run on float64 copies: the generic oracle for any update it implements.

    ``Float64Oracle(torch.optim.SGD, params, lr=0.1, momentum=0.9)`` builds
    ``torch.optim.SGD(copies, lr=0.1, momentum=0.9)`` over float64 copies of ``params``;
    ``step(grads)`` gives each copy its upcast gradient (None: no gradient, skipped as torch
    does) and steps. ``params`` are the float64 parameters; ``state(i)`` is parameter ``i``'s
    optimizer state.
    """

    def __init__(
        self, optimizer_cls: Callable[..., torch.optim.Optimizer], params: Sequence[Tensor], **hyperparameters: Any
    ) -> None:
        self.params = [_f64(param).requires_grad_(True) for param in params]
        self.optimizer = optimizer_cls(self.params, **hyperparameters)

    def step(self, grads: Sequence[Tensor | None]) -> None:
        if len(grads) != len(self.params):
            raise ValueError(f"{len(grads)} grads for {len(self.params)} params")
        for param, grad in zip(self.params, grads):
            param.grad = None if grad is None else _f64(grad)
        self.optimizer.step()

    def state(self, index: int) -> dict[str, Any]:
        """The optimizer state of parameter ``index`` (empty before its first step)."""
        return dict(self.optimizer.state.get(self.params[index], {}))
