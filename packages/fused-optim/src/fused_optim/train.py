"""Train an MLP on handwritten digits twice, with FusedSGD and with torch.optim.SGD, and compare
(with --optimizer adamw: FusedAdamW and torch.optim.AdamW).

Both models start from the same weights (same seed) and see the same
minibatches: they train in one process, stepping in turn on each batch
(fused_testing.parity's side-by-side harness), so each optimizer.step() is
timed under the same conditions. At the end: test accuracy and training loss of
both, the largest parameter difference, the loss per epoch and the time of one
optimizer step; each epoch is printed as it ends. The digits (1,797 8x8 images, the
UCI set as scikit-learn ships it) ship inside this package: no download. A run that
diverges (loss not finite, or above its start) says so and exits with status 3.
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fused_core import FusedOptimError
from fused_core.hyperparams import validate_group
from fused_core.optimizer import FusedOptimizer
from fused_testing.parity import make_model, mlp, train_side_by_side
from fused_testing.reference import relative_error

from . import devices
from .optimizers import DEFAULT, SPECS, OptimizerSpec, OptimizerUnavailable
from .plotting import require_matplotlib
from .train_data import NUM_CLASSES, Digits, batches_per_epoch, epoch_batches, load_digits
from .train_report import (
    EpochReport,
    RunReport,
    TrainReport,
    format_epoch,
    format_epoch_header,
    format_header,
    format_summary,
    write_json,
    write_plot,
)

NAME = "train"
HELP = (
    "train an MLP on handwritten digits with FusedSGD and torch.optim.SGD (or FusedAdamW and torch.optim.AdamW) "
    "side by side, and compare"
)

EXAMPLES = """\
examples:
  fused-optim train                            # 4 x 64 MLP, 20 epochs, a few seconds on a laptop CPU
  fused-optim train --plot curves.png --json run.json
  fused-optim train --depth 32 --width 32      # 66 small tensors: the many-tensor effect on step time
  fused-optim train --reference fused          # against torch's own fused kernel (it rounds differently)
  fused-optim train --optimizer adamw          # FusedAdamW against torch.optim.AdamW(foreach=False), lr 0.003
  fused-optim train --optimizer adamw --set amsgrad=True --set betas="(0.9, 0.99)"
  fused-optim train --device cuda --dtype bf16
"""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCES = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
HYPERPARAMETER_OPTIONS = {
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "nesterov": "--nesterov",
    "betas": "--betas",
    "eps": "--eps",
    "amsgrad": "--amsgrad",
}
"""Every hyperparameter option, by its key; each optimizer takes those of its ``train_defaults``."""


DIVERGED_EXIT = 3
"""Exit status of a run in which either optimizer diverged (loss not finite, or above its start)."""


class TrainError(Exception):
    """An option this machine cannot honour; reported as one line, without a traceback."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    model = parser.add_argument_group("model")
    model.add_argument("--width", type=_positive_int, default=64, help="units per hidden layer (default: %(default)s)")
    model.add_argument(
        "--depth",
        type=_non_negative_int,
        default=4,
        help="hidden layers, two tensors each; the classifier adds two more (default: %(default)s)",
    )
    optimizer = parser.add_argument_group("optimizer (the same for both runs; the defaults depend on --optimizer)")
    optimizer.add_argument(
        "--optimizer",
        choices=list(SPECS),
        default=DEFAULT,
        help="; ".join(f"{spec.name}: {spec.fused_name} against {spec.torch_path}" for spec in SPECS.values())
        + " (default: %(default)s)",
    )
    optimizer.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_setting,
        help="any hyperparameter of the optimizer, VALUE a Python literal (repeatable): --set alpha=0.9",
    )
    sgd, adamw = SPECS["sgd"].train_defaults, SPECS["adamw"].train_defaults
    optimizer.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default: {sgd['lr']} for sgd, where with momentum 0.9, 0.1 is on the edge of "
        f"stability; {adamw['lr']} for adamw)",
    )
    optimizer.add_argument("--momentum", type=float, help=f"sgd only (default: {sgd['momentum']})")
    optimizer.add_argument(
        "--weight-decay",
        type=float,
        help=f"(default: {sgd['weight_decay']} for sgd; {adamw['weight_decay']} for adamw, decoupled)",
    )
    optimizer.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (sgd only)")
    optimizer.add_argument(
        "--betas",
        type=float,
        nargs=2,
        metavar=("BETA1", "BETA2"),
        help="adamw only (default: {} {})".format(*adamw["betas"]),
    )
    optimizer.add_argument("--eps", type=float, help=f"adamw only (default: {adamw['eps']})")
    optimizer.add_argument("--amsgrad", action="store_true", default=None, help="AMSGrad (adamw only)")
    optimizer.add_argument(
        "--reference",
        choices=sorted(REFERENCES),
        default="for-loop",
        help="the torch optimizer to compare with: for-loop (foreach=False, the semantic reference; default), "
        "foreach or fused",
    )
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=_positive_int, default=20, help="(default: %(default)s)")
    training.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    training.add_argument(
        "--seed", type=int, default=0, help="initial weights, train/test split, batch order (default: %(default)s)"
    )
    training.add_argument("--device", default="cpu", help=devices.HELP)
    training.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype (default: %(default)s)"
    )
    training.add_argument(
        "--threads",
        type=_non_negative_int,
        default=1,
        help="CPU threads for torch, 0 for torch's own choice (default: %(default)s: these models are too small"
        " to gain from more, and on a busy machine extra threads make step times erratic)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--plot", type=Path, metavar="PATH", help="write loss curves and step-time bars (matplotlib)")
    output.add_argument("--json", type=Path, metavar="PATH", help="write every number of the run as JSON")


def _check_output(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.is_dir():
        raise TrainError(f"{option} {path}: directory {path.parent} does not exist")


@torch.no_grad()
def _evaluate(model: nn.Module, data: Digits, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(test accuracy, mean cross-entropy over the whole training set); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        test_logits = model(data.test_inputs.to(device, dtype))
        accuracy = (test_logits.argmax(dim=1).cpu() == data.test_targets).float().mean().item()
        train_logits = model(data.train_inputs.to(device, dtype)).float()
        loss = F.cross_entropy(train_logits, data.train_targets.to(device)).item()
    finally:
        model.train(was_training)
    return accuracy, loss


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _max_abs_diff(model_a: nn.Module, model_b: nn.Module) -> float:
    diffs = [
        (b.detach().double() - a.detach().double()).abs().max().item()
        for a, b in zip(model_a.parameters(), model_b.parameters())
    ]
    return max(diffs, default=0.0)


def _hyperparameters(args: argparse.Namespace, spec: OptimizerSpec) -> dict[str, Any]:
    """The optimizer's hyperparameters: the options given, its defaults for the others; an option
    another optimizer takes is an error."""
    options = HYPERPARAMETER_OPTIONS.items()
    given = [option for key, option in options if key not in spec.train_defaults and getattr(args, key) is not None]
    if given:
        raise TrainError(f"{', '.join(given)}: not an option of --optimizer {spec.name}")
    values: dict[str, Any] = {}
    for key, default in spec.train_defaults.items():
        value = getattr(args, key, None)
        values[key] = default if value is None else tuple(value) if isinstance(value, list) else value
    for key, value in getattr(args, "set", []):
        if key in HYPERPARAMETER_OPTIONS and getattr(args, key) is not None:
            raise TrainError(f"--set {key}: given twice (also as {HYPERPARAMETER_OPTIONS[key]})")
        values[key] = value
    return values


def _setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: VALUE a Python literal (a number, True, a tuple)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a Python literal (number, True, tuple)") from None


def _check_hyperparameters(fused: type[torch.optim.Optimizer], spec: OptimizerSpec, values: dict[str, Any]) -> None:
    """Before anything trains: the fused optimizer's own validation, then the torch class's."""
    if issubclass(fused, FusedOptimizer):
        validate_group(fused.hyperparameters, values, where=f"{spec.title} options", partial=True)
    try:
        spec.torch_optimizer([nn.Parameter(torch.zeros(1))], values, {})
    except (ValueError, TypeError) as error:
        raise TrainError(f"{spec.title} options: {error}") from None


def _prepare_kernels(
    fused: type[torch.optim.Optimizer], hyperparameters: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> float:
    """One untimed step of the fused optimizer on a throwaway parameter, so that compiling and checking
    the C kernels (a few seconds, the first time on a machine) is not counted as the first training
    step; its seconds."""
    start = time.perf_counter()
    param = nn.Parameter(torch.zeros(8, device=device, dtype=dtype))
    optimizer = fused([param], **hyperparameters)
    param.grad = torch.ones_like(param)
    optimizer.step()
    return time.perf_counter() - start


def _say(line: str) -> None:
    """A line on stdout now, even when piped (a progress bar on a terminal's stderr is kept below it)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def train(args: argparse.Namespace) -> TrainReport:
    """Both runs, as the options say, each epoch printed as it ends; raises :class:`TrainError` or a
    fused-optim error for bad options."""
    try:
        device = devices.resolve_device(args.device)
    except devices.DeviceError as error:
        raise TrainError(str(error)) from None
    dtype = DTYPES[args.dtype]
    spec = SPECS[args.optimizer]
    try:
        fused = spec.fused_class()
    except OptimizerUnavailable as error:
        raise TrainError(str(error)) from None
    hyperparameters = _hyperparameters(args, spec)
    _check_hyperparameters(fused, spec, hyperparameters)
    if args.plot is not None:
        try:
            require_matplotlib()
        except ImportError as error:
            raise TrainError(str(error)) from None
    _check_output(args.plot, "--plot")
    _check_output(args.json, "--json")

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_digits(seed=args.seed)
    build = functools.partial(
        mlp, in_features=data.features, width=args.width, depth=args.depth, num_classes=NUM_CLASSES
    )
    steps_per_epoch = batches_per_epoch(data, args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    torch_kwargs = REFERENCES[args.reference]
    if any(flag not in spec.flags for flag, on in torch_kwargs.items() if on):
        raise TrainError(f"--reference {args.reference}: {spec.torch_path} has no {args.reference} implementation")
    torch_name = spec.torch_name(torch_kwargs)
    config = {
        "width": args.width,
        "depth": args.depth,
        "optimizer": spec.name,
        **hyperparameters,
        **{key: getattr(args, key) for key in ("reference", "epochs", "batch_size", "seed", "dtype")},
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    data_summary = {
        "train": len(data.train_targets),
        "test": len(data.test_targets),
        "features": data.features,
        "classes": NUM_CLASSES,
    }
    probe = make_model(build, seed=args.seed)
    model_summary = {"tensors": len(list(probe.parameters())), "parameters": sum(p.numel() for p in probe.parameters())}
    del probe
    fused_name = spec.fused_name
    print(format_header(config, data_summary, model_summary, steps_per_epoch, torch_name, fused_name), flush=True)
    print("kernels:   ", end="", flush=True)
    ready_s = _prepare_kernels(fused, hyperparameters, device, dtype)
    print(f"{fused_name}'s ready in {ready_s:.1f} s (its C kernels are compiled on first use, then cached)", flush=True)
    print(flush=True)
    print(format_epoch_header(args.epochs, fused_name), flush=True)

    models: dict[str, nn.Module] = {}
    initial: dict[str, float] = {}

    def optimizer_for(key: str, make: Any) -> Any:
        def factory(model: nn.Module) -> torch.optim.Optimizer:
            models[key] = model
            initial[key] = _evaluate(model, data, device, dtype)[1]
            return make(model)

        return factory

    batches = epoch_batches(data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed + 1)
    progress = tqdm(
        batches,
        total=total_steps,
        desc="training both",
        unit="step",
        file=sys.stderr,
        disable=None,
        dynamic_ncols=True,
        leave=False,
    )
    rel_diff_per_step: list[float] = []
    epochs: list[EpochReport] = []

    def compare(step: int, torch_optimizer: torch.optim.Optimizer, fused_optimizer: torch.optim.Optimizer) -> None:
        diff = max(relative_error(b, a) for a, b in zip(_params(torch_optimizer), _params(fused_optimizer)))
        rel_diff_per_step.append(diff)
        epoch = step // steps_per_epoch + 1
        progress.set_postfix_str(f"epoch {epoch}/{args.epochs}, param diff {diff:.1e}", refresh=False)
        if (step + 1) % steps_per_epoch == 0 or step + 1 == total_steps:
            (accuracy_t, loss_t), (accuracy_f, loss_f) = (
                _evaluate(models[key], data, device, dtype) for key in ("torch", "fused")
            )
            epochs.append(EpochReport(epoch, (loss_t, loss_f), (accuracy_t, accuracy_f), diff))
            _say(format_epoch(epochs[-1], args.epochs, fused_name))

    with progress:
        result = train_side_by_side(
            optimizer_for(
                "torch", lambda model: spec.torch_optimizer(model.parameters(), hyperparameters, torch_kwargs)
            ),
            optimizer_for("fused", lambda model: fused(model.parameters(), **hyperparameters)),
            model_kind=build,
            batches=progress,
            seed=args.seed,
            dtype=dtype,
            device=device,
            between_steps=compare,
            time_steps=True,
        )

    runs = []
    for key, name, model, losses, seconds in (
        ("torch", torch_name, result.model_a, result.losses_a, result.step_seconds_a),
        ("fused", fused_name, result.model_b, result.losses_b, result.step_seconds_b),
    ):
        accuracy, train_loss = _evaluate(model, data, device, dtype)
        runs.append(RunReport(name, accuracy, train_loss, losses, seconds, initial_loss=initial[key]))
    return TrainReport(
        config=config,
        data=data_summary,
        model=model_summary,
        steps_per_epoch=steps_per_epoch,
        torch=runs[0],
        fused=runs[1],
        max_abs_diff=_max_abs_diff(result.model_a, result.model_b),
        max_rel_diff=result.max_relative_error,
        rel_diff_per_step=rel_diff_per_step,
        epochs=epochs,
    )


def run(args: argparse.Namespace) -> int:
    try:
        report = train(args)
    except (TrainError, FusedOptimError) as error:
        print(f"fused-optim train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fused-optim train: interrupted", file=sys.stderr)
        return 130
    print()
    print(format_summary(report), flush=True)
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    if report.diverged:
        names = " and ".join(run.name for run, _ in report.diverged)
        print(f"fused-optim train: error: training diverged ({names}); see DIVERGED above", file=sys.stderr)
        return DIVERGED_EXIT
    return 0
