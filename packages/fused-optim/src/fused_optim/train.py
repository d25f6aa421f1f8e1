"""Train an MLP on scikit-learn's handwritten digits twice, with FusedSGD and with torch.optim.SGD, and compare.

Both models start from the same weights (same seed) and see the same
minibatches: they train in one process, stepping in turn on each batch
(fused_testing.parity's side-by-side harness), so each optimizer.step() is
timed under the same conditions. At the end: test accuracy and training loss of
both, the largest parameter difference, the loss per epoch and the time of one
optimizer step. The digits (1,797 8x8 images) ship inside scikit-learn: no
download.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fused_core import FusedOptimError
from fused_core.hyperparams import validate_group
from fused_sgd import FusedSGD, SGDHyperparams
from fused_testing.parity import mlp, train_side_by_side
from fused_testing.reference import relative_error

from .train_data import NUM_CLASSES, Digits, batches_per_epoch, epoch_batches, load_digits
from .train_report import RunReport, TrainReport, check_plotting, format_summary, write_json, write_plot

NAME = "train"
HELP = "train an MLP on scikit-learn's digits with FusedSGD and torch.optim.SGD side by side, and compare"

EXAMPLES = """\
examples:
  fused-optim train                            # 4 x 64 MLP, 20 epochs, a few seconds on a laptop CPU
  fused-optim train --plot curves.png --json run.json
  fused-optim train --depth 32 --width 32      # 66 small tensors: the many-tensor effect on step time
  fused-optim train --reference fused          # against torch's own fused kernel (it rounds differently)
  fused-optim train --device cuda --dtype bf16
"""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCES = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
DEVICE_TYPES = ("cpu", "cuda", "npu")


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
    optimizer = parser.add_argument_group("optimizer (the same for both runs)")
    optimizer.add_argument("--lr", type=float, default=0.1, help="learning rate (default: %(default)s)")
    optimizer.add_argument("--momentum", type=float, default=0.9, help="(default: %(default)s)")
    optimizer.add_argument("--weight-decay", type=float, default=1e-4, help="(default: %(default)s)")
    optimizer.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    optimizer.add_argument(
        "--reference",
        choices=sorted(REFERENCES),
        default="for-loop",
        help="the torch.optim.SGD to compare with: for-loop (foreach=False, the semantic reference; default), "
        "foreach or fused",
    )
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=_positive_int, default=20, help="(default: %(default)s)")
    training.add_argument("--batch-size", type=_positive_int, default=32, help="(default: %(default)s)")
    training.add_argument(
        "--seed", type=int, default=0, help="initial weights, train/test split, batch order (default: %(default)s)"
    )
    training.add_argument(
        "--device", default="cpu", help="cpu (default), cuda[:N] or npu[:N] (npu imports torch_npu, only then)"
    )
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


def resolve_device(name: str) -> torch.device:
    """``name`` as a torch device, or :class:`TrainError` saying why this machine cannot run on it."""
    device_type, _, index = name.partition(":")
    if device_type not in DEVICE_TYPES or (index and not index.isdigit()):
        raise TrainError(f"--device {name!r}: expected cpu, cuda[:N] or npu[:N]")
    if device_type == "npu":
        _import_torch_npu()  # registers the "npu" device type with torch
    device = torch.device(name)
    if device.type != "cpu":
        module = getattr(torch, device.type)
        if not module.is_available():
            why = (
                "this torch build has no CUDA" if device.type == "cuda" and torch.version.cuda is None else "none found"
            )
            raise TrainError(f"--device {name}: no {device.type.upper()} device is available ({why})")
        if device.index is not None and device.index >= module.device_count():
            raise TrainError(f"--device {name}: there are only {module.device_count()} {device.type.upper()} devices")
    return device


def _import_torch_npu() -> None:
    try:
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "torch_npu":
            raise TrainError(f"--device npu: torch_npu could not be imported: {error}") from None
        raise TrainError(
            "--device npu needs torch_npu (Ascend's PyTorch adapter), which is not installed; "
            f"install the torch_npu release that matches torch {torch.__version__}"
        ) from None
    except (ImportError, OSError, RuntimeError) as error:
        raise TrainError(f"--device npu: torch_npu could not be imported: {error}") from None


def _check_output(path: Path | None, option: str) -> None:
    if path is not None and not path.parent.is_dir():
        raise TrainError(f"{option} {path}: directory {path.parent} does not exist")


@torch.no_grad()
def _evaluate(model: nn.Module, data: Digits, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(test accuracy, mean cross-entropy over the whole training set)."""
    model.eval()
    test_logits = model(data.test_inputs.to(device, dtype))
    accuracy = (test_logits.argmax(dim=1).cpu() == data.test_targets).float().mean().item()
    train_logits = model(data.train_inputs.to(device, dtype)).float()
    loss = F.cross_entropy(train_logits, data.train_targets.to(device)).item()
    return accuracy, loss


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _max_abs_diff(model_a: nn.Module, model_b: nn.Module) -> float:
    diffs = [
        (b.detach().double() - a.detach().double()).abs().max().item()
        for a, b in zip(model_a.parameters(), model_b.parameters())
    ]
    return max(diffs, default=0.0)


def train(args: argparse.Namespace) -> TrainReport:
    """Both runs, as the options say; raises :class:`TrainError` or a fused-optim error for bad options."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    hyperparameters: dict[str, Any] = dict(
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov
    )
    validate_group(SGDHyperparams, hyperparameters, where="SGD options")
    if args.plot is not None:
        try:
            check_plotting()
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
    torch_kwargs = REFERENCES[args.reference]
    torch_name = "torch.optim.SGD({})".format(", ".join(f"{k}={v}" for k, v in torch_kwargs.items()))

    batches = epoch_batches(data, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed + 1)
    progress = tqdm(
        batches,
        total=args.epochs * steps_per_epoch,
        desc="training both",
        unit="step",
        file=sys.stderr,
        disable=None,
        dynamic_ncols=True,
    )
    rel_diff_per_step: list[float] = []

    def compare(step: int, torch_optimizer: torch.optim.Optimizer, fused_optimizer: torch.optim.Optimizer) -> None:
        diff = max(relative_error(b, a) for a, b in zip(_params(torch_optimizer), _params(fused_optimizer)))
        rel_diff_per_step.append(diff)
        progress.set_postfix_str(
            f"epoch {step // steps_per_epoch + 1}/{args.epochs}, param diff {diff:.1e}", refresh=False
        )

    with progress:
        result = train_side_by_side(
            lambda model: torch.optim.SGD(model.parameters(), **hyperparameters, **torch_kwargs),
            lambda model: FusedSGD(model.parameters(), **hyperparameters),
            model_kind=build,
            batches=progress,
            seed=args.seed,
            dtype=dtype,
            device=device,
            between_steps=compare,
            time_steps=True,
        )

    runs = []
    for name, model, losses, seconds in (
        (torch_name, result.model_a, result.losses_a, result.step_seconds_a),
        ("FusedSGD", result.model_b, result.losses_b, result.step_seconds_b),
    ):
        accuracy, train_loss = _evaluate(model, data, device, dtype)
        runs.append(RunReport(name, accuracy, train_loss, losses, seconds))
    parameters = list(result.model_a.parameters())
    return TrainReport(
        config={
            **{key: getattr(args, key) for key in ("width", "depth", "lr", "momentum", "weight_decay", "nesterov")},
            **{key: getattr(args, key) for key in ("reference", "epochs", "batch_size", "seed", "dtype")},
            "device": str(device),
            "threads": torch.get_num_threads(),
        },
        data={
            "train": len(data.train_targets),
            "test": len(data.test_targets),
            "features": data.features,
            "classes": NUM_CLASSES,
        },
        model={"tensors": len(parameters), "parameters": sum(p.numel() for p in parameters)},
        steps_per_epoch=steps_per_epoch,
        torch=runs[0],
        fused=runs[1],
        max_abs_diff=_max_abs_diff(result.model_a, result.model_b),
        max_rel_diff=result.max_relative_error,
        rel_diff_per_step=rel_diff_per_step,
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
    print(format_summary(report))
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
