"""The ``linprobe`` command line: list a model's layers, probe a finished model or its saved checkpoints,
reproduce the paper."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from linprobe import __version__, distributed
from linprobe.atomic import atomic_write_text
from linprobe.capture.cache import CacheError
from linprobe.capture.reduce import DEFAULT_FEATURE_BUDGET
from linprobe.capture.taps import layer_names
from linprobe.data.datasets import standard_splits
from linprobe.finished import probe
from linprobe.report.html import write_report
from linprobe.report.results import ProbeResult
from linprobe.training.sweeps import build_model, find_checkpoints, import_factory, sweep


class UsageError(Exception):
    """A mistake in the command's arguments, reported in one line with the usage."""


def load_model(spec: str, checkpoint: str | None = None) -> nn.Module:
    """Build a model from ``package.module:function`` and load a checkpoint (a state dict, or a dict
    holding one under ``state_dict`` or ``model``) when given."""
    return build_model(import_factory(spec), spec, checkpoint)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,28,28, got {text!r}")
    return shape


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use --device cpu")
    return device


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _task_option(text: str) -> str:
    """``NAME=SPEC`` as ``--task`` takes it (checked here, built by ``_tasks``)."""
    name, _, spec = text.partition("=")
    kind, _, arg = spec.partition(":")
    if not name or kind not in ("control", "shuffled", "labels", "values"):
        raise argparse.ArgumentTypeError(f"expected NAME=control[:SEED], NAME=shuffled[:SEED], NAME=labels:FILE.npz "
                                         f"or NAME=values:FILE.npz, got {text!r}")
    if kind in ("control", "shuffled") and arg and not arg.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: the seed after {kind}: must be a whole number")
    if kind in ("labels", "values") and not Path(arg).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: {arg or 'FILE'} is not a file (an .npz of arrays train, valid, "
                                         "test)")
    return text


def _tasks(options: Sequence[str] | None) -> dict[str, Any]:
    """The ``--task`` options as ``probe``'s ``tasks``."""
    from linprobe.fit import tasks

    built: dict[str, Any] = {}
    for text in options or ():
        name, _, spec = text.partition("=")
        kind, _, arg = spec.partition(":")
        if kind == "control":
            built[name] = tasks.control_task(seed=int(arg or 0))
        elif kind == "shuffled":
            built[name] = tasks.shuffled_labels(seed=int(arg or 0))
        else:
            with np.load(arg) as arrays:
                missing = {"train", "valid"} - set(arrays.files)
                if missing:
                    raise UsageError(f"--task {text}: {arg} has arrays {arrays.files}, not {sorted(missing)}; save "
                                     "np.savez(FILE, train=..., valid=..., test=...)")
                given = {split: arrays[split] for split in ("train", "valid", "test") if split in arrays.files}
            built[name] = (tasks.labels if kind == "labels" else tasks.values)(**given)
    return built


def _add_probe_options(p: argparse.ArgumentParser, out_help: str) -> None:
    """The data, layer, reduction and output options ``probe`` and ``sweep`` share."""
    p.add_argument("--data", default="mnist", help="mnist (default), fashion-mnist, digits, idx:DIR, a .npz/.pt file "
                                                   "of arrays (x, y or x_train, y_train, ...) or "
                                                   "package.module:function returning them")
    p.add_argument("--layers", nargs="+", default=["all"], help="names, glob patterns or 'all' (default)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--reduce", default="auto", help="auto (default), none, pool, pool:K, subset:K or project:K")
    p.add_argument("--budget", type=_positive, default=DEFAULT_FEATURE_BUDGET, help="feature budget of the auto policy")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="cache storage type")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--limit", type=_positive, help="keep at most this many training samples (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--max-iter", type=_positive, default=500, help="L-BFGS iterations per L2 (default 500)")
    p.add_argument("--no-bootstrap", action="store_true",
                   help="leave out the bootstrap intervals (balanced error, F1, AUROC, R^2); top-1/top-5 intervals stay")
    p.add_argument("--no-standardize", action="store_true",
                   help="fit the probes on the raw features instead of standardised ones (see docs/benchmarks.md)")
    p.add_argument("--task", action="append", type=_task_option, metavar="NAME=SPEC", dest="tasks",
                   help="another label set fitted on the same features (repeatable): NAME=control[:SEED] (Hewitt & "
                        "Liang's control task, with selectivity), NAME=shuffled[:SEED], NAME=labels:FILE.npz or "
                        "NAME=values:FILE.npz (arrays train, valid, test: classes or regression targets)")
    p.add_argument("--device", type=_device, default=torch.device("cpu"),
                   help="where the model runs and the probes are fitted: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--config", help="a TOML file whose keys mirror these flags (flags given here override it); every "
                                    "run writes its own as OUT/run.toml, so it reruns from that one file")
    p.add_argument("--distribute", choices=["rows", "layers", "checkpoints"], default="rows",
                   help="under torchrun: each process fits its rows of every layer (rows, default), whole layers "
                        "(layers, cheaper with many layers on a shared disk) or, for sweep, whole checkpoints "
                        "(checkpoints); ignored in one process")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linprobe", description="Linear classifier probes on every layer of a PyTorch model.")
    p.add_argument("--traceback", action="store_true", help="on an error, show the full traceback instead of one line")
    p.add_argument("--version", action="version", version=f"linprobe {__version__} (torch {torch.__version__})")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="say what is done (-v: each step of a run, -vv: debug messages too)")
    sub = p.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers", help="list a model's tappable layer names")
    layers.add_argument("--model", required=True, help="model factory, package.module:function")
    layers.add_argument("--input-shape", type=_shape, help="per-sample input shape (e.g. 1,28,28): list in execution order")
    pr = sub.add_parser("probe", help="probe every chosen layer of a finished model; writes a table and a figure")
    pr.add_argument("--model", required=True, help="model factory, package.module:function")
    pr.add_argument("--checkpoint", help="state dict to load into the model")
    _add_probe_options(pr, "output folder (results, figure, probes and feature cache)")
    sw = sub.add_parser("sweep", help="probe every saved checkpoint of a run into one table; resumes where it stopped",
                        description="Probe the same layers of every saved checkpoint of a run: one tidy table "
                                    "(step, layer, split, metric, value), a heatmap, an animation and diagnostics. "
                                    "A killed sweep resumes at the first unfinished checkpoint; a checkpoint added "
                                    "later costs only its own extraction.")
    sw.add_argument("--model", required=True, help="model factory, package.module:function")
    sw.add_argument("--checkpoints", required=True,
                    help="a glob ('runs/x/*.pt'), a folder, or a manifest checkpoints.json / .csv (step -> file); "
                         "steps come from file names like step_500.pt, ckpt-500.pth, epoch=3-step=1200.ckpt")
    _add_probe_options(sw, "sweep folder (per-step records, feature caches, table and figures)")
    sw.add_argument("--no-figures", action="store_true", help="skip the heatmap, animation and diagnostics")
    rep = sub.add_parser("report", help="(re)build RUN_DIR/report.html from the results saved there")
    rep.add_argument("run_dir", help="a folder written by linprobe probe, sweep or reproduce")
    rp = sub.add_parser("reproduce", help="run one of the paper's experiments (--list shows them)")
    rp.add_argument("name", nargs="?", help="experiment name")
    rp.add_argument("--list", action="store_true", help="list the experiments and exit")
    rp.add_argument("--quick", action="store_true", help="small, seeded, seconds (what the tests run)")
    rp.add_argument("--data", help="mnist (default), fashion-mnist, digits or idx:DIR")
    rp.add_argument("--out", help="output folder (default runs/NAME)")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--seeds", type=_positive, help="run this many seeds (--seed, --seed + 1, ...) into OUT/seed-K and "
                    "combine them: the spread per layer, a verdict over seeds; full runs use the experiment's "
                    "multi-seed setting where it has one")
    rp.add_argument("--variant", help="deep-mlp: plain, aux or skip")
    rp.add_argument("--steps", type=_positive, nargs="+", help="deep-mlp / inception: minibatches at which to probe")
    rp.add_argument("--depths", type=_positive, nargs="+", help="depth: the model depths to sweep")
    rp.add_argument("--quiet", action="store_true", help="no progress bars")
    for command in (layers, pr, sw, rep, rp):  # an error shows the usage of its own command
        command.set_defaults(print_usage=command.print_usage)
    return p


def _reproduce(args: argparse.Namespace) -> None:
    from linprobe.experiments import available, reproduce

    if args.list or not args.name:
        if not args.list:
            raise UsageError("name an experiment, or pass --list")
        print("\n".join(f"{name:15s} {doc}" for name, doc in available().items()))
        return
    options = {k: getattr(args, k) for k in ("variant", "steps", "depths") if getattr(args, k) is not None}
    out = Path(args.out or f"runs/{args.name}")
    summary = reproduce(args.name, out, quick=args.quick, data=args.data, seed=args.seed, progress=not args.quiet,
                        seeds=args.seeds, **options)
    print(summary.markdown())
    if args.seeds:
        print(f"wrote {out}/summary.md, seeds.csv, seeds.png and each seed's run in {out}/seed-K")
    else:  # what this experiment wrote, not what most do
        print(f"wrote {out}/: {', '.join(sorted(f'{p.name}/' if p.is_dir() else p.name for p in out.iterdir()))}")


def _splits(args: argparse.Namespace) -> dict[str, Any]:
    return standard_splits(args.data, seed=args.seed, limit=args.limit)


def _probe_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"layers": args.layers, "reduce": args.reduce, "feature_budget": args.budget, "dtype": args.dtype,
            "batch_size": args.batch_size, "seed": args.seed, "progress": not args.quiet,
            "max_iter": args.max_iter, "distribute": args.distribute, "standardize": not args.no_standardize,
            "tasks": _tasks(args.tasks), "bootstrap": not args.no_bootstrap}


def _print_result(result: ProbeResult, wrote: str) -> None:
    """The table and what was written, once: by rank 0 under torchrun."""
    if distributed.rank() != 0:
        return
    for task in result.tasks:  # the terminal's width; every metric is in results.csv
        if len(result.tasks) > 1:
            print(f"\ntask {task}:")
        print(result.table(metrics=("top1_error", "selectivity", "r2"), task=task))
    for layer, reason in result.meta.get("invalid", {}).items():
        print(f"{layer}: invalid: {reason}")
    for layer, reason in result.meta.get("not_converged", {}).items():
        print(f"{layer}: not converged: {reason} (raise --max-iter)")
    skipped = result.meta.get("skipped", {})
    if skipped:
        print(f"skipped {len(skipped)} module(s) that give nothing to probe (result.meta['skipped'] / results.json): "
              + "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:3])
              + ("; ..." if len(skipped) > 3 else ""))
    print(f"\nwrote {wrote}")


def _sweep(args: argparse.Namespace) -> None:
    import_factory(args.model)  # a wrong --model or glob fails at once, before any data is loaded
    found = find_checkpoints(args.checkpoints)
    splits = _splits(args)
    result = sweep(args.model, found, splits["train"], splits["valid"], splits["test"], out=args.out,
                   figures=not args.no_figures, device=args.device, **_probe_options(args))
    write_config(args, Path(args.out))
    figures = "".join(f", {Path(f).name}" for f in result.meta.get("figures", {}).values())
    _print_result(result, f"{Path(args.out) / 'results.csv'} ({len(found)} checkpoints), results.json{figures} "
                          "and steps/")


def _run(args: argparse.Namespace) -> None:
    if args.command == "reproduce":
        _reproduce(args)
        return
    if args.command == "sweep":
        _sweep(args)
        return
    if args.command == "report":
        print(f"wrote {write_report(args.run_dir)}")
        return
    if args.command == "probe" and args.distribute == "checkpoints":
        raise UsageError("--distribute checkpoints shares a sweep's checkpoints between processes; probe has one "
                         "model: use rows (default) or layers")
    model = load_model(args.model, getattr(args, "checkpoint", None))
    if args.command == "layers":
        example = torch.zeros(1, *args.input_shape) if args.input_shape else None
        try:
            names = layer_names(model, example)
        except RuntimeError as e:
            raise UsageError(f"the model cannot run on an input of shape {args.input_shape}: {e}") from e
        print("\n".join(names))
        return
    splits = _splits(args)
    result = probe(model.to(args.device), splits["train"], splits["valid"], splits["test"], cache_dir=args.out,
                   **_probe_options(args))
    write_config(args, Path(args.out))
    _print_result(result, f"{Path(args.out) / 'report.html'} (open it in a browser), results.csv, results.json, "
                          f"errors.png, probes/ and {CONFIG}")


_INPUT_ERRORS = (UsageError, ValueError, TypeError, CacheError, OSError, KeyError)
"""Errors that mean the input is wrong (exit status 2); anything else is a failure (status 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: every mistake prints the command's usage and one line (no traceback) and exits non-zero.

    Status 0 on success and for ``--help``, 2 for wrong input, 1 for any other failure, 130 when
    interrupted (complete cache splits are kept, so a rerun resumes).
    """
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _apply_config(parser, argv)
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed the help, or the usage and one line
        return int(e.code or 0)
    except UsageError as e:
        print(f"linprobe: error: {e}", file=sys.stderr)
        return 2
    _configure_logging(args.verbose)
    try:
        _run(args)
    except KeyboardInterrupt:
        print(f"linprobe {args.command}: interrupted; completed cache splits are kept, rerun to resume",
              file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback:
            raise
        args.print_usage(sys.stderr)
        text = " ".join(str(e).split()) or "(no message)"
        if not isinstance(e, _INPUT_ERRORS):
            text = f"{type(e).__name__}: {text} (rerun with --traceback for details)"
        print(f"linprobe {args.command}: error: {text}", file=sys.stderr)
        return 2 if isinstance(e, _INPUT_ERRORS) else 1
    return 0


CONFIG = "run.toml"
_NOT_SETTINGS = {"command", "config", "print_usage", "traceback", "verbose", "quiet"}


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """With ``--config FILE`` on a probe or sweep command line: the file's keys become that command's defaults
    (so flags override them), and options it gives are no longer required on the command line."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return
    import tomllib  # Python 3.11+

    path = Path(argv[argv.index("--config") + 1])
    try:
        found = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--config {path}: {e}") from None
    command = next((a for a in argv if a in ("probe", "sweep")), None)
    sub = _subparser(parser, command) if command else None
    if sub is None:
        raise UsageError("--config belongs to the probe and sweep commands: linprobe probe --config run.toml")
    actions = {a.dest: a for a in sub._actions if a.dest not in _NOT_SETTINGS | {"help"}}
    settings = {key.replace("-", "_"): value for key, value in found.items()}
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise UsageError(f"--config {path}: unknown key(s) {unknown}; {command} takes {sorted(actions)}")
    for dest, value in settings.items():
        actions[dest].required = False
    sub.set_defaults(**settings)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def write_config(args: argparse.Namespace, out: Path) -> Path:
    """``OUT/run.toml``: every setting of this run, so ``--config OUT/run.toml`` runs it again."""
    lines = []
    for key, value in sorted(vars(args).items()):
        if key in _NOT_SETTINGS or value is None or callable(value):
            continue
        value = str(value) if isinstance(value, torch.device) else value
        lines.append(f"{key.replace('_', '-')} = {json.dumps(value)}")
    atomic_write_text(out / CONFIG, "\n".join(lines) + "\n")
    return out / CONFIG


def _configure_logging(verbose: int) -> None:
    """linprobe's loggers to standard error: warnings only by default, each step with -v, debug with -vv."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("linprobe")
    logger.setLevel(level)
    for old in [h for h in logger.handlers if getattr(h, "linprobe_cli", False)]:
        logger.removeHandler(old)  # a handler holds the stderr of its time; each run gets today's
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("linprobe: %(message)s"))
    handler.linprobe_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def entry() -> Any:
    """``python -m linprobe``."""
    sys.exit(main())
