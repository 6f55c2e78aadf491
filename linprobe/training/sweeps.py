"""Probes after the fact: the same probes on every saved checkpoint of a run, in one tidy table.

A sweep folder holds::

    sweep.json                   the settings (model factory, layers, data, probe options); a rerun must match
    features/<key>/              ``probe``'s feature cache, one key per checkpoint (the key has the model's digest)
    steps/<step>/                one checkpoint's results.csv, results.json and probes/, then record.json last
    results.csv, results.json    every step's rows, rebuilt from steps/ at the end of each run
    heatmap.png, animation.gif, diagnostics.md   ``linprobe.report.timeline``

A step is done exactly when its ``record.json`` exists (it is written after everything else of the step), so
a killed sweep resumes at the first step without one, and a checkpoint added later costs only its own
extraction and fits. Each step's probes start from the previous step's probes as saved on disk, never from
the copy in memory, so a resumed sweep computes exactly what an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import glob
import importlib
import inspect
import json
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from linprobe import distributed
from linprobe.atomic import atomic_write_text
from linprobe.data.inputs import Split, as_splits
from linprobe.finished import probe
from linprobe.fit.probes import ProbeBank
from linprobe.fit.tasks import describe_spec, resolve, targets_fingerprint
from linprobe.report.results import ProbeResult

ModelSource = Union[str, Callable[[], nn.Module], nn.Module]
"""``package.module:function``, a function building the model, or a model to load each checkpoint into."""

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
MANIFEST_NAMES = ("checkpoints.json", "checkpoints.csv")
SETTINGS = "sweep.json"
RECORD = "record.json"
_STEP_WORD = re.compile(r"(?<![a-z])(?:global_)?step[=_-]?(\d+)", re.IGNORECASE)
_SWEEP_SET = frozenset({"cache_dir", "out_dir", "step", "warm_start", "plot", "progress"})
"""``probe`` options the sweep sets itself."""
_NOT_SETTINGS = frozenset({"batch_size", "distribute"})
"""``probe`` options that change the results at most within float tolerance, so a rerun may change them."""


class CheckpointError(ValueError):
    """Checkpoints that cannot be found, numbered or loaded."""


class SweepError(ValueError):
    """A sweep folder that belongs to a different sweep."""


# ------------------------------------------------------------------------------ finding checkpoints


def parse_step(path: str | Path) -> int:
    """The training step in a checkpoint's file name: ``step_00500.pt``, ``epoch=3-step=1200.ckpt``
    (the number after ``step`` wins) or ``ckpt-500.pth`` (the only number)."""
    stem = Path(path).stem
    marked = _STEP_WORD.findall(stem)
    if len(marked) == 1:
        return int(marked[0])
    numbers = re.findall(r"\d+", stem)
    if not marked and len(numbers) == 1:
        return int(numbers[0])
    found = ", ".join(marked or numbers) or "none"
    raise CheckpointError(f"cannot tell the step of checkpoint {Path(path).name!r} (numbers found: {found}); name "
                          "files like step_500.pt, or list them in a manifest checkpoints.json {\"500\": \"file.pt\"}")


def find_checkpoints(spec: str | Path) -> list[tuple[int, Path]]:
    """Checkpoints as (step, file), ascending: ``spec`` is a glob, a folder (its manifest if it has one, else its
    ``*.pt|pth|ckpt|bin|safetensors`` files) or a manifest (``.json`` {step: file} or ``.csv`` with columns
    step,path)."""
    path = Path(spec)
    if path.is_dir():
        manifests = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
        if manifests:
            return _read_manifest(manifests[0])
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        where = f"folder {str(spec)!r} holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})"
    elif path.is_file() and path.suffix in (".json", ".csv"):
        return _read_manifest(path)
    else:
        files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
        where = f"no file matches {str(spec)!r}"
    if not files:
        raise CheckpointError(f"{where}; pass a glob like 'runs/x/*.pt', a folder of checkpoints or a manifest "
                              "checkpoints.json")
    return _by_step([(parse_step(p), p) for p in files])


def _read_manifest(path: Path) -> list[tuple[int, Path]]:
    """(step, file) pairs from a manifest; file paths are relative to the manifest's folder."""
    try:
        if path.suffix == ".json":
            entries = json.loads(path.read_text())
            pairs = list(entries.items()) if isinstance(entries, dict) else [(e["step"], e["path"]) for e in entries]
        else:
            with path.open(newline="") as f:
                pairs = [(row["step"], row["path"]) for row in csv.DictReader(f)]
        steps = [(int(step), path.parent / file) for step, file in pairs]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read checkpoint manifest {str(path)!r} ({type(e).__name__}: {e}); write it as "
                              "JSON {\"500\": \"step_500.pt\", ...} or CSV with a header step,path") from None
    missing = [str(p) for _, p in steps if not p.is_file()]
    if missing:
        raise CheckpointError(f"manifest {str(path)!r} lists missing checkpoint file(s) {missing}; fix the paths "
                              "(relative to the manifest's folder)")
    return _by_step(steps)


def _by_step(pairs: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """Sorted by step; two files for one step is an error naming both."""
    seen: dict[int, Path] = {}
    for step, file in pairs:
        if step < 0:
            raise CheckpointError(f"checkpoint {str(file)!r} has a negative step {step}; steps count up from 0")
        if step in seen:
            raise CheckpointError(f"checkpoints {str(seen[step])!r} and {str(file)!r} both claim step {step}; "
                                  "remove one, narrow the glob, or list the files in a manifest checkpoints.json")
        seen[step] = file
    if not seen:
        raise CheckpointError("no checkpoints to sweep; the glob, folder or manifest is empty")
    return sorted(seen.items())


# ------------------------------------------------------------------------------ building models


def import_factory(spec: str) -> Callable[[], Any]:
    """The function named by ``package.module:function``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must look like package.module:function, got {spec!r}")
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        return factory
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load model factory {spec!r}: {e}") from e


def build_model(factory: Callable[[], Any], name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """Call ``factory`` without arguments and load ``checkpoint`` into the model it returns."""
    try:
        model = factory()
    except TypeError as e:
        raise ValueError(f"model factory {name!r} cannot be called without arguments ({e}); name a function that "
                         "builds the model alone") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    return model


def load_checkpoint(model: nn.Module, checkpoint: str | Path, name: str) -> None:
    """Load a state dict (or a dict holding one under ``state_dict`` or ``model``; ``.safetensors`` too) into
    ``model``, strictly. Keys under one common prefix that the model lacks (Lightning's ``model.``, DDP's
    ``module.``, ``torch.compile``'s ``_orig_mod.``) are matched without it."""
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not exist")
    try:
        state = _read_state(Path(checkpoint))
        if isinstance(state, dict):
            state = state.get("state_dict", state.get("model", state))
        model.load_state_dict(_without_prefix(state, set(model.state_dict())))
    except Exception as e:  # any failure here means this file is not a checkpoint of this model
        raise CheckpointError(f"cannot load checkpoint {str(checkpoint)!r} into {name}: {e}") from e


def _read_state(path: Path) -> Any:
    """The object saved in a torch file (tensors and plain containers only), or a safetensors file's tensors."""
    if path.suffix != ".safetensors":
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's own message advises weights_only=False, which would run pickled code
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {path} cannot be read as tensors ({first}): it is truncated, "
                                  "corrupt, or holds objects other than tensors and plain containers; save "
                                  "model.state_dict() instead") from None
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("reading .safetensors checkpoints needs the safetensors package: "
                          "pip install safetensors") from None
    return load_file(path, device="cpu")


def _without_prefix(state: Any, expected: set[str]) -> Any:
    """``state`` with the shortest dotted key prefix removed after which its keys are exactly ``expected``; as it
    is when there is none (``load_state_dict`` then names the keys that differ)."""
    if not isinstance(state, Mapping) or set(state) == expected or not expected:
        return state
    some = next(iter(expected))  # the prefix is what stands before this key in one of the saved keys
    prefixes = {key[:-len(some)] for key in state if key.endswith("." + some)}
    for prefix in sorted(prefixes, key=len):
        stripped = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if set(stripped) == expected:
            return stripped
    return state


def _factory_name(factory: Callable[..., Any]) -> str:
    """``module:qualname`` of a model factory, with the bound arguments of a ``functools.partial`` (no address, so
    the same factory has the same name in every run and a resumed sweep recognises its folder)."""
    if isinstance(factory, functools.partial):
        bound = [repr(a) for a in factory.args] + [f"{k}={v!r}" for k, v in factory.keywords.items()]
        return f"{_factory_name(factory.func)}({', '.join(bound)})"
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', type(factory).__qualname__)}"


def _model_loader(model: ModelSource, device: str | torch.device | None = None,
                  ) -> tuple[str, Callable[[Path], nn.Module]]:
    """A name for the settings and a function giving the model with one checkpoint loaded: the model is built
    once and each checkpoint loaded into it (strictly, so nothing of the previous one is left), on ``device``
    when one is given."""
    build: Callable[[], nn.Module]
    if isinstance(model, nn.Module):
        name, build = type(model).__qualname__, lambda: model
    else:
        name = model if isinstance(model, str) else _factory_name(model)
        factory = import_factory(model) if isinstance(model, str) else model
        build = functools.cache(lambda: build_model(factory, name))

    def load(path: Path) -> nn.Module:
        built = build()
        load_checkpoint(built, path, name)
        return built if device is None else built.to(device)
    return name, load


# ------------------------------------------------------------------------------ the sweep


def sweep(model: ModelSource, checkpoints: str | Path | Sequence[tuple[int, str | Path]], train: Any, valid: Any,
          test: Any = None, *, out: str | Path, layers: Any = "all", figures: bool = True, progress: bool = True,
          device: str | torch.device | None = None, **options: Any) -> ProbeResult:
    """Probe ``layers`` of every checkpoint (a ``find_checkpoints`` spec or (step, file) pairs) into one table.

    ``model`` is ``package.module:function``, a function building the model, or a model to load each checkpoint
    into; ``device`` (e.g. ``"cuda"``) is where the model runs and the probes are fitted (default: where the
    factory puts the model); ``options`` are ``probe``'s (``reduce``, ``l2_path``, ``max_iter``, ...). Steps
    already recorded in ``out`` are read back, not recomputed; ``out`` made with other settings is refused. Each
    step's probes are warm-started from the previous step's saved probes (a convex fit: the same optimum, fewer
    iterations). With ``figures`` the timeline of the valid top-1 error (heatmap, animation, diagnostics) is
    written to ``out`` (``meta["figures"]``). Under torch.distributed every rank runs the probes and only rank 0
    writes records; with ``distribute="checkpoints"`` each rank instead probes its own contiguous share of the
    checkpoints alone (no collectives; cheaper when there are more checkpoints than ranks), warm-starting within
    its share only, and every rank reads the combined table once all are recorded.
    """
    found = find_checkpoints(checkpoints) if isinstance(checkpoints, (str, Path)) else _by_step(
        [(int(s), Path(p)) for s, p in checkpoints])
    name, load = _model_loader(model, device)
    distributed.init_from_env()  # under torchrun: know the ranks before deciding who writes
    out = Path(out)
    splits = as_splits({"train": train, "valid": valid, "test": test}, options.get("inputs"))
    _claim(out, _settings(name, splits, {"layers": layers, **options}))
    done = {step for step, path in found if _is_done(out, step, path)}
    distributed.barrier()  # every rank has decided what is done before rank 0 records anything
    todo = [(step, path) for step, path in found if step not in done]
    alone: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if options.get("distribute") == "checkpoints":  # each rank probes its own contiguous share, alone
        share = distributed.shard_range(len(todo), distributed.rank(), distributed.world_size())
        todo, alone, options = todo[share.start:share.stop], distributed.local(), {**options, "distribute": "rows"}
    with alone:
        _probe_steps(found, todo, done, load, splits, out=out, layers=layers, progress=progress, **options)
    distributed.barrier()
    result = collect(out, [step for step, _ in found])
    result.meta["checkpoints"] = {str(step): str(path) for step, path in found}
    if distributed.rank() == 0:
        result.save(out)
        if figures:
            from linprobe.report.timeline import save_timeline

            result.meta["figures"] = {k: str(v) for k, v in save_timeline(result, out).items()}
    return result


def _probe_steps(found: Sequence[tuple[int, Path]], todo: Sequence[tuple[int, Path]], done: set[int],
                 load: Callable[[Path], nn.Module], splits: Mapping[str, Any], *, out: Path, layers: Any,
                 progress: bool, **options: Any) -> None:
    """Probe and record the ``todo`` steps in order, each warm-started from the step before it when that one
    was recorded before the sweep began or by this process (never by another one: that would be a race)."""
    previous = {step: before for before, (step, _) in zip([None, *[s for s, _ in found]], found)}
    ready = set(done)
    for step, path in tqdm(todo, desc="sweep checkpoints", disable=not progress):
        folder, before = out / "steps" / str(step), previous[step]
        warm = ProbeBank.load(out / "steps" / str(before) / "probes") if before in ready else None
        probe(load(path), *splits.values(), layers=layers, cache_dir=out, out_dir=folder, step=step,
              warm_start=warm, plot=False, progress=progress, **options)
        if distributed.rank() == 0:
            atomic_write_text(folder / RECORD, json.dumps(_identity(step, path), indent=1))
        distributed.barrier()
        ready.add(step)


def collect(out: str | Path, steps: Sequence[int]) -> ProbeResult:
    """The combined table of the recorded ``steps`` of a sweep folder."""
    folders = [Path(out) / "steps" / str(step) for step in steps]
    missing = [f.name for f in folders if not (f / RECORD).is_file()]
    if missing:
        raise SweepError(f"steps {missing} of {str(out)!r} are not recorded yet; run the sweep to complete them")
    return ProbeResult.concat([ProbeResult.load(f) for f in folders])


def _settings(model: str, splits: Mapping[str, Split], options: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that changes a sweep's numbers, JSON-ready: model, data digests and every ``probe`` option
    (defaults filled in, so leaving an option out and passing its default are the same sweep)."""
    params = {k: p for k, p in inspect.signature(probe).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - set(params) | set(options) & _SWEEP_SET)
    if unknown:
        raise TypeError(f"sweep() got option(s) {unknown} it cannot pass on; it takes probe()'s options except "
                        f"{sorted(_SWEEP_SET)}: {sorted(set(params) - _SWEEP_SET)}")
    chosen = {k: options.get(k, p.default) for k, p in params.items() if k not in _SWEEP_SET | _NOT_SETTINGS}
    chosen["tasks"] = {name: describe_spec(spec) for name, spec in (chosen["tasks"] or {}).items()}
    targets = resolve(options.get("tasks"), splits, options.get("batch_size", 256))
    settings = {"model": model, "data": {k: v.fingerprint() for k, v in splits.items()},
                "targets": targets_fingerprint(targets), **chosen}
    plain: dict[str, Any] = json.loads(json.dumps(settings, default=lambda v: getattr(v, "__qualname__", str(v))))
    return plain


def _claim(out: Path, settings: dict[str, Any]) -> None:
    """Refuse a folder made by a sweep with other settings; otherwise record ours (rank 0)."""
    path = out / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in sorted(set(before) | set(settings))
                   if before.get(k) != settings.get(k)]
        if changed:
            raise SweepError(f"{str(out)!r} holds a sweep made with other settings ({'; '.join(changed)}); pass "
                             "another output folder, or delete this one to start over")
    elif distributed.rank() == 0:
        atomic_write_text(path, json.dumps(settings, indent=1))


def _identity(step: int, path: Path) -> dict[str, Any]:
    """What a step's record remembers of its checkpoint file: replacing or touching the file re-probes it."""
    st = path.stat()
    return {"step": step, "checkpoint": path.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_done(out: Path, step: int, path: Path) -> bool:
    """True when ``step`` is recorded for this same checkpoint file; a record of another file is stale."""
    record = out / "steps" / str(step) / RECORD
    if not record.is_file():
        return False
    if json.loads(record.read_text()) == _identity(step, path):
        return True
    warnings.warn(f"the checkpoint of step {step} ({path}) changed since it was probed; probing it again",
                  stacklevel=3)
    return False
