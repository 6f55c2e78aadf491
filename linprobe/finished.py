"""Probing a finished model: extract every tap once into the cache, fit each probe to convergence.

The L2 of each probe is chosen on the validation split; test labels are read only after every
probe is fixed, for one final evaluation.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from linprobe import distributed
from linprobe.capture.cache import CacheError, FeatureCache, open_reserved
from linprobe.capture.extract import extract_split, model_device
from linprobe.capture.reduce import (
    DEFAULT_FEATURE_BUDGET,
    ReduceSpec,
    Reduction,
    Standardizer,
    reduction_from_dict,
    resolve_reductions,
)
from linprobe.capture.taps import LayerSpec, Plan, RepeatPolicy, Selector, Taps, TokenReduction, frozen
from linprobe.data.inputs import InputSpec, Split, as_splits
from linprobe.fit.evaluate import Evaluation, evaluate
from linprobe.fit.probes import LinearProbe, ProbeBank
from linprobe.fit.ridge import fit_ridge_paths
from linprobe.fit.solvers import DEFAULT_L2_PATH, FitSettings, FittedPath, fit_paths, group_key
from linprobe.fit.tasks import Targets, TaskSpec, baselines, describe_spec, resolve
from linprobe.fit.uncertainty import differs_beyond_noise
from linprobe.report.html import write_report
from linprobe.report.provenance import provenance
from linprobe.report.results import MAIN, LayerInfo, ProbeResult

log = logging.getLogger(__name__)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's structure (its repr: every submodule and its settings, e.g. an activation swapped or a
    kernel size changed) and every parameter and buffer: a new checkpoint, a new key."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    h.update(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()[:16]


def cache_key(model: nn.Module, layers: list[str], reduce: Any, **options: Any) -> str:
    """The cache folder name: everything that changes the stored features, hashed."""
    spec = {"model": model_fingerprint(model), "layers": layers, "reduce": _spec_json(reduce), **options}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _selector_key(select: Selector | Mapping[str, Selector] | None) -> Any:
    """What identifies ``select=`` in the cache key, per layer for a mapping: a function's name and a digest of its
    code, so editing a selector (a lambda too) changes the key, and no memory address does."""
    if isinstance(select, Mapping):
        return {name: _selector_key(fn) for name, fn in sorted(select.items())}
    if select is None:
        return None
    code = getattr(select, "__code__", None)
    name = getattr(select, "__qualname__", type(select).__qualname__)
    return name if code is None else f"{name}:{_code_digest(code)}"


def _code_digest(code: Any) -> str:
    """A digest of a code object's bytecode and constants (nested code objects by their own digest)."""
    h = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        h.update((_code_digest(const) if hasattr(const, "co_code") else repr(const)).encode())
    h.update(repr(code.co_names).encode())
    return h.hexdigest()[:16]


def _spec_json(reduce: Any) -> Any:
    if isinstance(reduce, Reduction):
        return reduce.to_dict()
    if isinstance(reduce, Mapping):
        return {k: _spec_json(v) for k, v in reduce.items()}
    return reduce


def probe(model: nn.Module, train: Any, valid: Any, test: Any = None, *, layers: LayerSpec = "all",
          cache_dir: str | Path | None = None, out_dir: str | Path | None = None, reduce: ReduceSpec = "auto",
          feature_budget: int = DEFAULT_FEATURE_BUDGET, dtype: str = "float32",
          l2_path: tuple[float, ...] = DEFAULT_L2_PATH, batch_size: int = 256, seed: int = 0,
          select: Selector | Mapping[str, Selector] | None = None, tokens: TokenReduction = "auto",
          repeat: RepeatPolicy = "each", inputs: InputSpec | None = None, step: int = 0, progress: bool = True,
          plot: bool = True, max_iter: int = 500, patience: int | None = 2, warm_start: ProbeBank | None = None,
          distribute: str = "rows", standardize: bool = True, tasks: Mapping[str, TaskSpec] | None = None,
          bootstrap: bool = True) -> ProbeResult:
    """Probe every chosen layer of a finished model: train / valid (/ test) error, top-5, cross-entropy.

    Data are ``(x, y)`` arrays or tensors (``x`` of any dtype, or a tuple / dict of them: ``model(*x)``,
    ``model(**x)``), Datasets or DataLoaders yielding ``(x, y)`` or a dict holding ``labels`` (``inputs=``
    names other keys; see ``linprobe.data.inputs``). Labels ``(N, T)`` with -100 for unlabelled tokens make each
    labelled token a sample. ``layers="all"`` probes every module that runs and gives a per-sample tensor
    (``meta["skipped"]`` says what was left out and why), ``"residual"`` a transformer's residual stream; a
    module called several times gives a probe per call (``name#k``) unless ``repeat=`` says otherwise.
    ``tokens="auto"`` averages a ``(B, T, D)`` output over the real tokens of the batch's ``attention_mask``
    (and keeps it whole without a mask); ``"mean"``, ``"first"``, ``"last"`` use the mask too. Features are cached under
    ``cache_dir/features/<key>`` (a temporary folder when ``cache_dir`` is None) and reused when the
    model, layers, reductions and data are the same. Results (``results.csv``, ``results.json``,
    ``errors.png``, ``report.html``, ``probes/``) go to ``out_dir``, else ``cache_dir``. The model is run in eval
    mode under ``no_grad`` and its modes are restored afterwards (``meta["model_was_training"]``).
    ``meta["provenance"]`` records what produced the numbers: versions, device, threads, every setting
    above, the command line, the start and wall time and the git commit of the working directory.

    Labels may be any whole numbers >= 0; the classes found in train become probe outputs 0..K-1 in
    ascending order (``meta["classes"]``). ``tasks`` adds label sets fitted on the same features, with no
    second forward pass (``linprobe.fit.tasks``): ``{"coarse": lambda y: y // 5, "control": control_task(),
    "size": values(train=..., valid=..., test=...)}``; each has its own probes and rows (the ``task`` column; the
    data's own labels are ``"main"``), and a control or shuffled task a ``selectivity`` row per layer and split.
    Every number carries a 95% confidence interval (``lo``, ``hi``): Wilson's for top-1 and top-5 error, a seeded
    bootstrap for the others, which ``bootstrap=False`` leaves out (docs/benchmarks.md measures its cost). A layer with a NaN or Inf in any split gets no probe: it
    is reported in ``meta["invalid"]`` and by one ``invalid`` row holding the first offending sample.

    ``max_iter`` (L-BFGS iterations per L2) and ``patience`` (stop the L2 path after that many rises
    of valid cross-entropy; None fits it all) set the solver; ``warm_start`` (the ``probes`` of an
    earlier result, e.g. the previous checkpoint) starts each layer's fit from its earlier probe. Layers of one
    width are fitted together (``solvers.fit_paths``). ``standardize`` (default) centres and scales every feature
    with the training statistics before the fit (the L2 then weighs every feature alike); ``False`` fits the raw
    features (the solver is preconditioned, so this costs no speed; docs/benchmarks.md compares both).

    Under ``torchrun`` (or in a caller's torch.distributed job) every rank calls ``probe`` with the same
    arguments: each rank extracts its own contiguous share of every split into its own cache shard
    (``cache_dir`` must be on a filesystem every rank sees). ``distribute="rows"`` then fits every layer
    with all ranks together, each holding its rows (losses and gradients summed over ranks);
    ``"layers"`` gives each rank whole layers, read from the shared cache, which suits many layers and
    few rows per rank (docs/scaling.md). Every rank returns the same result and rank 0 alone writes the
    files. ``"layers"`` gives exactly the one-process result; ``"rows"`` sums in another order, so its
    probes equal one process's to the solver's tolerance (at the flat, weakly regularised end of the
    L2 path that can tip the choice of L2). A model wrapped in DistributedDataParallel is unwrapped.
    """
    started = time.time()
    select_key = _selector_key(select)
    settings = {"layers": layers, "reduce": reduce, "feature_budget": feature_budget, "dtype": dtype,
                "l2_path": l2_path, "batch_size": batch_size, "seed": seed, "select": select_key,
                "tokens": tokens, "repeat": repeat, "inputs": inputs, "step": step, "max_iter": max_iter,
                "patience": patience, "warm_start": warm_start is not None, "distribute": distribute,
                "standardize": standardize, "tasks": {name: describe_spec(t) for name, t in (tasks or {}).items()},
                "bootstrap": bootstrap}
    if distribute not in ("rows", "layers"):
        raise ValueError(f"distribute must be 'rows' or 'layers', not {distribute!r}")
    fit = FitSettings(l2_path=tuple(l2_path), max_iter=max_iter, patience=patience)
    distributed.init_from_env()
    model = distributed.unwrap(model)
    spec = inputs or InputSpec()
    splits = as_splits({"train": train, "valid": valid, "test": test}, spec)
    _check_inputs(splits, dtype)
    targets = resolve(tasks, splits, batch_size)
    was_training = any(m.training for m in model.modules())
    with ExitStack() as stack:
        root = Path(cache_dir) if cache_dir is not None else _temporary_root(stack)
        taps = stack.enter_context(Taps(model, layers, select=select, tokens=tokens, repeat=repeat))
        key = cache_key(model, taps.names, reduce, budget=feature_budget, seed=seed, dtype=dtype,
                        tokens=tokens, select=select_key, repeat=repeat, inputs=repr(spec))
        cache = stack.enter_context(FeatureCache(root / "features" / key, key).locked_by_job())
        stats = _extract_all(taps, splits, cache, reduce, feature_budget, seed, dtype, batch_size, progress)
        result, banks = _fit_all(cache, targets, "test" in splits, fit, model_device(model), step, progress,
                                 warm_start, distribute, standardize, bootstrap)
        _warn_unfinished(result, max_iter, step)
        _warn_invalid(result)
        _note_overfitting(result)
        skipped = cache.manifest.get("plan", {}).get("skipped")
        if skipped:
            result.meta["skipped"] = dict(skipped)
        result.meta.update(cache=str(cache.root), extraction_samples_per_s=stats, model=type(model).__name__,
                           extracted_in_eval_mode=True, model_was_training=was_training,
                           processes=distributed.world_size(), distribute=distribute,
                           provenance=provenance(settings, started=started, device=model_device(model)))
        out = out_dir if out_dir is not None else cache_dir
        if result.meta.get("skipped"):
            log.info("skipped %d module(s) that give nothing to probe (meta['skipped'])", len(result.meta["skipped"]))
        if out is not None and distributed.rank() == 0:
            _save(result, banks, Path(out), plot and "test" in splits)
            log.info("wrote the results of %d layer(s) into %s", len(banks[MAIN]), out)
    result.probes, result.banks = banks[MAIN], banks  # type: ignore[attr-defined]
    return result


def _warn_unfinished(result: ProbeResult, max_iter: int, step: int) -> None:
    """Say which chosen probes stopped at ``max_iter`` before converging: their errors are an unfinished fit's."""
    unfinished = result.meta.get("not_converged", {})
    if unfinished and distributed.rank() == 0:
        names = ", ".join(list(unfinished)[:5]) + (", ..." if len(unfinished) > 5 else "")
        at = f" at step {step}" if step else ""
        warnings.warn(f"{len(unfinished)} probe(s) reached max_iter={max_iter}{at} before converging ({names}; see "
                      "result.meta['not_converged']): their errors are those of an unfinished fit; pass a larger "
                      "max_iter (--max-iter on the command line)", stacklevel=3)


def _warn_invalid(result: ProbeResult) -> None:
    """Say which layers got no probe because their features hold NaN or Inf."""
    invalid = result.meta.get("invalid", {})
    if invalid and distributed.rank() == 0:
        first = next(iter(invalid.items()))
        warnings.warn(f"{len(invalid)} layer(s) hold NaN or Inf and got no probe (first: {first[0]}: {first[1]}; see "
                      "result.meta['invalid'])", stacklevel=3)


OVERFIT_TRAIN, OVERFIT_GAP = 0.01, 0.05


def _note_overfitting(result: ProbeResult) -> None:
    """Name the probes that fit train almost perfectly (top-1 error <= 1%) while their valid error is at least 5
    points higher, beyond noise: the paper's overfitting case (section 3.4), which a reviewer checks. They go into
    ``meta["overfit"]`` and one logged warning that says what helps."""
    train, valid = result.errors("train"), result.errors("valid")
    n = result.meta.get("samples", {}).get("valid")
    found = {layer: f"train top-1 error {train[layer]:.3f}, valid {valid[layer]:.3f}" for layer in train
             if layer in valid and train[layer] <= OVERFIT_TRAIN and valid[layer] - train[layer] >= OVERFIT_GAP
             and (n is None or differs_beyond_noise(valid[layer], train[layer], n))}
    if found and distributed.rank() == 0:
        result.meta["overfit"] = found
        names = ", ".join(list(found)[:5]) + (", ..." if len(found) > 5 else "")
        log.warning("%d probe(s) fit train almost perfectly but not valid (%s; result.meta['overfit']): their "
                    "errors measure the probe's overfitting as much as the layer; fewer features (reduce='pool', "
                    "'subset:1000') or more training samples narrow the gap", len(found), names)


def _temporary_root(stack: ExitStack) -> Path:
    """A temporary cache folder made by rank 0 and removed when it is done; every rank gets its path."""
    made = stack.enter_context(tempfile.TemporaryDirectory()) if distributed.rank() == 0 else None
    return Path(cast(str, distributed.broadcast_object(made)))  # rank 0's folder, on every rank


def _check_inputs(splits: Mapping[str, Split], dtype: str) -> None:
    """Refuse, before any forward pass, an empty split, inputs holding NaN or Inf, or a storage type that would
    not hold features."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16' (the cache's storage type), not {dtype!r}")
    for name, data in splits.items():
        if len(data) == 0:
            raise ValueError(f"the {name} split is empty: probing needs samples in every split")
        data.check_finite(name)


def _extract_all(taps: Taps, splits: Mapping[str, Split], cache: FeatureCache, reduce: ReduceSpec, budget: int,
                 seed: int, dtype: str, batch_size: int, progress: bool) -> dict[str, float]:
    """Extract the splits not already complete in the cache; returns samples/s per extracted split."""
    def reductions(features: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, Reduction]:
        shapes = {n: tuple(h.shape[1:]) for n, h in features.items()}
        chosen = resolve_reductions(reduce, shapes, budget=budget, seed=seed, layouts=plan.layouts)
        cache.set_layers(list(features), {n: {"shape": list(shapes[n]), "reduction": r.to_dict(),
                                              "features": r.out_features(shapes[n])} for n, r in chosen.items()},
                         plan=plan.to_dict())
        return chosen

    speeds = {}
    with frozen(taps.model):
        for name, split in splits.items():
            if not distributed.broadcast_object(cache.is_complete(name, split.fingerprint())):  # rank 0's view
                log.info("extracting the %s split (%d samples) into %s", name, len(split), cache.root)
                speeds[name] = extract_split(taps, split, cache, name, reductions=reductions, batch_size=batch_size,
                                             dtype=dtype, progress=progress)
            else:
                log.info("the %s split is already extracted in %s: read back, no forward pass", name, cache.root)
    return speeds


_BLOCK_BYTES = 16 << 20  # rows are read ~16 MiB (as float64) at a time, whatever the layer's width
_BATCH_BYTES = 2 << 30  # the standardised layers fitted together as one batch take at most this much scratch


def _blocks(raw: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``raw`` (N, D) in row blocks of about 16 MiB, with the first row of each (one empty block when N = 0)."""
    rows = max(1, _BLOCK_BYTES // (8 * max(raw.shape[1], 1)))
    for start in range(0, max(len(raw), 1), rows):
        yield start, raw[start:start + rows]


def _scratch(shape: tuple[int, ...], device: torch.device, folder: Path) -> torch.Tensor:
    """An uninitialised float32 tensor for the fit: in a GPU's memory, or on the CPU in an unlinked memory-mapped
    file under ``folder``, so the fit's passes read the layers through the page cache, which the OS can evict,
    instead of anonymous memory: the fit's memory stays flat in N (docs/benchmarks.md)."""
    if device.type != "cpu":
        return torch.empty(shape, device=device)
    fd, path = tempfile.mkstemp(dir=folder, prefix=".fit-", suffix=".npy")
    os.close(fd)
    try:
        out = open_reserved(Path(path), shape, np.float32)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise CacheError(f"disk full: the fit's standardised copy of the layers ({np.prod(shape) * 4 / 2**20:.0f} MiB) "
                         f"does not fit in {folder}: free some space there") from None
    finally:
        os.unlink(path)  # the mapping keeps the data; the file is gone when the tensor is, even after a kill
    return torch.from_numpy(out)


def _standardize_into(out: torch.Tensor, raw: np.ndarray, standardizer: Standardizer) -> torch.Tensor:
    """Cached features standardised block by block into ``out``."""
    for start, block in _blocks(raw):
        out[start:start + len(block)] = standardizer(torch.from_numpy(np.array(block, dtype=np.float32))).to(out.device)
    return out


def _standardized(raw: np.ndarray, standardizer: Standardizer, device: torch.device, scratch: Path) -> torch.Tensor:
    """One split of one layer, standardised into fresh scratch."""
    return _standardize_into(_scratch(raw.shape, device, scratch), raw, standardizer)


def _batches(cache: FeatureCache, names: list[str], rows: int) -> list[list[str]]:
    """The layers in batches fitted together: one width (or all fitted in their row space), in execution order,
    each batch's standardised copy within ``_BATCH_BYTES``."""
    groups: dict[int, list[list[str]]] = {}
    for name in names:
        width = cache.layers[name]["features"]
        batches = groups.setdefault(group_key(rows, width), [[]])
        size = sum(cache.layers[n]["features"] for n in batches[-1]) * rows * 4
        if batches[-1] and size + width * rows * 4 > _BATCH_BYTES:
            batches.append([])
        batches[-1].append(name)
    return [batch for batches in groups.values() for batch in batches]


def _fit_all(cache: FeatureCache, tasks: list[Targets], has_test: bool, fit: FitSettings, device: torch.device,
             step: int, progress: bool, warm_start: ProbeBank | None = None, distribute: str = "rows",
             standardize: bool = True, bootstrap: bool = True) -> tuple[ProbeResult, dict[str, ProbeBank]]:
    """Fit one probe per task and valid cached layer (L2 chosen on valid), then evaluate every probe once on test.

    Layers of one width are standardised once and fitted together for every task (``solvers.fit_paths``,
    ``ridge.fit_ridge_paths``). Under torch.distributed, ``distribute="rows"`` fits each layer on this rank's rows
    with the other ranks (``sharded``); ``"layers"`` fits this rank's layers on all rows and gathers every rank's
    probes.
    """
    sharded = distribute == "rows" and distributed.world_size() > 1
    splits = ("train", "valid", "test") if has_test else ("train", "valid")
    rows = {split: _rows(cache, split) if sharded else slice(None) for split in splits}
    full = {t.name: {s: t.splits[s].to(device) for s in splits} for t in tasks}
    for split in splits:
        if len(full[MAIN][split]) != cache.manifest["splits"][split]["rows"]:
            raise CacheError(f"the {split} data give {len(full[MAIN][split])} labelled rows but "
                             f"{cache.manifest['splits'][split]['rows']} were extracted into {cache.root}: the data "
                             "changed between passes (a dataset must give the same samples on every pass)")
    mine = {name: {s: y[rows[s]] for s, y in ys.items()} for name, ys in full.items()}
    invalid = _invalid_layers(cache, splits)
    fitted: dict[str, dict[str, tuple[LinearProbe, dict[str, Evaluation]]]] = {t.name: {} for t in tasks}
    read_seconds = 0.0
    batches = _my_batches(cache, invalid, distribute, len(full[MAIN]["train"]))
    quiet = not progress or distributed.rank() != 0
    bar = tqdm(total=sum(map(len, batches)) * len(fit.path) * len(tasks), desc="fit probes", unit="fit",
               disable=quiet, leave=False)
    for batch in batches:
        width = cache.layers[batch[0]]["features"]
        bar.set_postfix_str(f"{batch[0]}{f' and {len(batch) - 1} more' if len(batch) > 1 else ''} ({width} features)",
                            refresh=False)  # the layers being fitted, not only how many are done
        raws = [cache.features("train", name, rows=rows["train"]) for name in batch]
        stds = [_standardizer(raw, sharded, standardize) for raw in raws]
        start = time.perf_counter()
        x_train: torch.Tensor | list[torch.Tensor]
        if len({raw.shape[1] for raw in raws}) == 1:  # one (P, N, D) tensor: batched products
            x_train = _scratch((len(batch), *raws[0].shape), device, cache.root)
            for x, raw, std in zip(x_train, raws, stds):
                _standardize_into(x, raw, std)
        else:
            x_train = [_standardized(raw, std, device, cache.root) for raw, std in zip(raws, stds)]
        read_seconds += time.perf_counter() - start
        x_valid = [_standardized(cache.features("valid", name, rows=rows["valid"]), std, device, cache.root)
                   for name, std in zip(batch, stds)]
        for task in tasks:
            y = mine[task.name]
            probes = [LinearProbe(name, reduction_from_dict(cache.layers[name]["reduction"]),
                                  cache.layers[name]["features"], task.outputs, kind=task.kind, task=task.name).to(device)
                      for name in batch]
            if task.kind == "classes":
                inits = [_earlier(warm_start, p) if task.name == MAIN else None for p in probes]
                paths: Sequence[FittedPath] = fit_paths(x_train, y["train"], x_valid, y["valid"], task.outputs, fit,
                                  inits=[p.weights() if p is not None else None for p in inits], sharded=sharded,
                                  scratch=lambda shape: _scratch(shape, device, cache.root), on_fit=bar.update)
            else:
                paths = fit_ridge_paths(x_train, y["train"], x_valid, y["valid"], fit, sharded=sharded)
                bar.update(len(batch) * len(fit.path))
            for probe, path, std, xt, xv in zip(probes, paths, stds, x_train, x_valid):
                probe.adopt(path, std)
                fitted[task.name][probe.layer] = probe, {
                    split: evaluate(task, _gathered(probe.logits(x), sharded), full[task.name][split],
                                    bootstrap=bootstrap)
                    for split, x in (("train", xt), ("valid", xv))}
        del x_train, x_valid
    bar.close()
    if has_test:  # the first and only read of the test labels, after every probe is chosen
        for name, (probe, _) in fitted[MAIN].items():
            x_test = _standardized(cache.features("test", name, rows=rows["test"]), Standardizer(probe.mean, probe.std),
                                   device, cache.root)
            for task in tasks:
                task_probe, found = fitted[task.name][name]
                found["test"] = evaluate(task, _gathered(task_probe.logits(x_test), sharded), full[task.name]["test"],
                                         bootstrap=bootstrap)
    if distribute == "layers":
        fitted = {task: {name: part for parts in distributed.all_gather_object(mine_) for name, part in parts.items()}
                  for task, mine_ in fitted.items()}
    result, banks = _assemble(cache, fitted, invalid, tasks, step)
    result.meta["cache_read_samples_per_s"] = len(mine[MAIN]["train"]) / max(read_seconds, 1e-9)  # read + standardised
    return result, banks


def _gathered(out: torch.Tensor, sharded: bool) -> torch.Tensor:
    """A probe's outputs on every rank's rows, in row order, when ``sharded``; else as they are."""
    if not sharded:
        return out
    return torch.cat([part.to(out.device) for part in distributed.all_gather_object(out.cpu())])


def _rows(cache: FeatureCache, split: str) -> slice:
    """This rank's rows of ``split``: its own shard when the cache was extracted by as many ranks, else an even
    contiguous share."""
    shards = cache.manifest["splits"][split]["shards"]
    rank, world = distributed.rank(), distributed.world_size()
    if len(shards) == world and all("start" in s for s in shards):
        mine = sorted(shards, key=lambda s: s["start"])[rank]
        return slice(mine["start"], mine["start"] + mine["rows"])
    share = distributed.shard_range(cache.manifest["splits"][split]["rows"], rank, world)
    return slice(share.start, share.stop)


def _my_batches(cache: FeatureCache, invalid: Mapping[str, Any], distribute: str, rows: int) -> list[list[str]]:
    """The batches of valid layers this rank fits: all of them, or with ``distribute="layers"`` its share of whole
    batches, balanced by size. Whole batches, because a batched fit's last bits depend on its members: so each
    rank fits exactly the batches one process would, and the result is the one-process result bit for bit."""
    batches = _batches(cache, [name for name in cache.manifest["order"] if name not in invalid], rows)
    if distribute == "rows":
        return batches
    costs = [sum(cache.layers[name]["features"] for name in batch) for batch in batches]
    owner = distributed.assign(costs, distributed.world_size())
    return [batch for batch, r in zip(batches, owner) if r == distributed.rank()]


def _standardizer(raw: np.ndarray, sharded: bool, standardize: bool) -> Standardizer:
    """The training statistics of ``raw`` (the identity when not ``standardize``), over every rank's rows when
    ``sharded``: then in float64 and two passes, and a collective that all ranks call for the same layer (a rank
    fitting its own layers uses ``Standardizer.fit``)."""
    if not standardize:
        return Standardizer.identity(raw.shape[1])
    if not sharded:
        return Standardizer.fit(block for _, block in _blocks(raw))
    n = distributed.total(len(raw), torch.device("cpu"))
    if n == 0:
        raise ValueError("cannot standardise an empty training split")

    def chunks() -> Iterator[torch.Tensor]:
        return (torch.from_numpy(np.array(block, dtype=np.float64)) for _, block in _blocks(raw))

    mean = distributed.all_reduce_sum(cast(torch.Tensor, sum(c.sum(0) for c in chunks()))) / n
    m2 = distributed.all_reduce_sum(cast(torch.Tensor, sum(((c - mean) ** 2).sum(0) for c in chunks())))
    return Standardizer.from_moments(n, mean, m2)


def _assemble(cache: FeatureCache, fitted: Mapping[str, Mapping[str, tuple[LinearProbe, dict[str, Evaluation]]]],
              invalid: Mapping[str, tuple[str, dict[str, Any]]], tasks: list[Targets],
              step: int) -> tuple[ProbeResult, dict[str, ProbeBank]]:
    """The result table and one bank per task, layers in execution order, test rows last; a baseline task's rows
    end with its selectivity."""
    main = tasks[0]
    result = ProbeResult([], meta={"classes": main.classes, "tasks": {t.name: t.describe() for t in tasks},
                                   "samples": {split: len(y) for split, y in main.splits.items()}})
    banks = {t.name: ProbeBank() for t in tasks}
    for name in cache.manifest["order"]:
        meta = cache.layers[name]
        info = LayerInfo(name, tuple(meta["shape"]), int(np.prod(meta["shape"])), meta["features"], meta["reduction"],
                         main.chance_error() or 0.0)
        result.layers.append(info)
        if name in invalid:
            split, found = invalid[name]
            result.add(step, name, split, {"invalid": found["sample"]})
            result.meta.setdefault("invalid", {})[name] = (f"{found['value']} at sample {found['sample']} of the "
                                                           f"{split} split (batch {found['batch']})")
            continue
        info.l2 = fitted[MAIN][name][0].l2
        for task in tasks:
            probe, evaluations = fitted[task.name][name]
            result.add(step, name, "valid", {"l2": cast(float, probe.l2)}, task=task.name)
            for split in ("train", "valid"):
                result.add(step, name, split, evaluations[split].metrics, task=task.name,
                           intervals=evaluations[split].intervals)
            banks[task.name].append(probe)
    for task in tasks:
        for probe in banks[task.name]:
            evaluations = fitted[task.name][probe.layer][1]
            if "test" in evaluations:
                result.add(step, probe.layer, "test", evaluations["test"].metrics, task=task.name,
                           intervals=evaluations["test"].intervals)
    for task in tasks:
        for probe in banks[task.name]:
            for split, evaluation in fitted[task.name][probe.layer][1].items():
                result.predictions[f"{step}/{task.name}/{split}/{probe.layer}"] = _compact(evaluation.predictions)
                result.predictions.setdefault(f"{step}/{task.name}/{split}/:targets", _compact(task.splits[split]))
    for baseline, of in baselines(tasks).items():
        for probe in banks[baseline]:
            for split, evaluation in fitted[baseline][probe.layer][1].items():
                other = fitted[of][probe.layer][1][split]
                result.add(step, probe.layer, split, {"selectivity": evaluation.metrics["top1_error"]
                                                      - other.metrics["top1_error"]}, task=baseline)
    unfinished = {(p.layer if task == MAIN else f"{task}:{p.layer}"): f"l2={p.l2:g}: stopped after {p.iterations} "
                  "iterations" for task, bank in banks.items() for p in bank if p.converged is False}
    if unfinished:
        result.meta["not_converged"] = unfinished
    return result, banks


def _compact(values: torch.Tensor) -> np.ndarray:
    """Predictions or targets as the smallest numpy type that holds them: class codes in int16 (int32 beyond),
    values in float32."""
    array = values.detach().cpu().numpy()
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    return array.astype(np.int16 if array.size == 0 or array.max() < 2**15 else np.int32)


def _earlier(bank: ProbeBank | None, probe: LinearProbe) -> LinearProbe | None:
    """The earlier probe of the same layer and shape to warm-start from, if there is one."""
    if bank is None or probe.layer not in bank.layers:
        return None
    old = bank[probe.layer]
    return old if old.weight.shape == probe.weight.shape else None


def _invalid_layers(cache: FeatureCache, splits: tuple[str, ...]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Layers whose features hold a NaN or Inf: the first split where it happens and where in it."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for split in splits:
        for name, where in cache.manifest["splits"][split].get("nonfinite", {}).items():
            found.setdefault(name, (split, where))
    return found


def _save(result: ProbeResult, banks: Mapping[str, ProbeBank], out: Path, plot: bool) -> None:
    """The run folder: the tables, the probes (another task's under ``probes/tasks/<name>``), the figure
    (``plot``) and ``report.html``, which shows them all."""
    result.save(out)
    for task, bank in banks.items():
        bank.save(out / "probes" if task == MAIN else out / "probes" / "tasks" / task)
    if plot and len(banks[MAIN]):  # ProbeResult.errors leaves out the layers found invalid
        result.plot(out / "errors.png")
    if plot:
        write_report(out, result)
