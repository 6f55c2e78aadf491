"""Taps: choose layers of any ``nn.Module`` and capture snapshots of their outputs with forward hooks.

A layer is addressed by its dotted module name, a glob pattern, a module type, ``"all"`` or
``"residual"``; ``"input"`` is the model's own input (the paper's layer 0), ``"name:input"`` the first
input of module ``name`` and ``"name#k"`` its (k+1)-th call in one forward. Captured outputs are
detached at the hook, so nothing downstream of a tap can send a gradient back into the model (the
paper's diode), and they are snapshots: an output that the model later changes in place (``ReLU(inplace=
True)``, ``out += identity``) is copied at the hook, found by torch's version counter.

The first forward discovers what runs: which modules, how often, with which per-sample shapes
(``Plan``). Later forwards keep only the planned captures, token-reduce and reduce them inside the
hook (so a batch's raw activations are never all held at once) and may stop the forward early.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn

from linprobe.data.inputs import Batch

INPUT = "input"
LayerSpec = str | type[nn.Module] | Sequence[str | type[nn.Module]]
Selector = Callable[[Any], torch.Tensor]
TokenReduction = Literal["auto", "mean", "first", "last", "none"] | None
RepeatPolicy = Literal["each", "error", "first", "last", "all"]
TOKEN_REDUCTIONS = ("auto", "mean", "first", "last", "none", None)
REPEAT_POLICIES = ("each", "error", "first", "last", "all")
_CHANNELS_FIRST = (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                   nn.AdaptiveMaxPool1d, nn.LPPool1d, nn.BatchNorm1d, nn.InstanceNorm1d)
_DISCOVERY_BATCH = 4


class LayerSelectionError(ValueError):
    """A requested layer does not exist, matches nothing or cannot be captured."""


class _StopForward(Exception):
    """Raised from a hook once every planned capture is taken: the rest of the forward is waste."""


class CaptureChanged(RuntimeError):
    """A capture kept without a copy was changed in place later in the forward (it was not in the first forward):
    its features are wrong for this batch; from the next forward on it is copied at the hook."""


@dataclass(frozen=True)
class Target:
    """One place to hook: a module's output (or first input), every call or one (``call``), named or matched."""

    module: str
    kind: Literal["output", "input"] = "output"
    call: int | None = None
    explicit: bool = True

    @property
    def name(self) -> str:
        base = self.module if self.kind == "output" else (INPUT if not self.module else f"{self.module}:input")
        return base if self.call is None else f"{base}#{self.call}"

    @property
    def key(self) -> tuple[str, str]:
        """The hook this target needs: (module name, "output" or "input")."""
        return self.module, self.kind


@dataclass(frozen=True)
class Capture:
    """A planned capture: the calls of a target it keeps (several: concatenated) and how its tensor is laid out."""

    name: str
    key: tuple[str, str]
    calls: tuple[int, ...]
    layout: Literal["tokens", "channels_first"] = "tokens"


@dataclass
class Plan:
    """What the first forward found: captures in execution order, what was skipped and why, and the captures
    whose outputs the model changes in place afterwards (those are copied at the hook)."""

    captures: list[Capture]
    skipped: dict[str, str] = field(default_factory=dict)
    mutable: set[str] = field(default_factory=set)

    @property
    def layouts(self) -> dict[str, str]:
        """Each capture's layout, which the automatic reduction needs for (T, D) outputs."""
        return {c.name: c.layout for c in self.captures}

    def to_dict(self) -> dict[str, Any]:
        return {"captures": [[c.name, list(c.key), list(c.calls), c.layout] for c in self.captures],
                "skipped": dict(self.skipped), "mutable": sorted(self.mutable)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls([Capture(n, (k[0], k[1]), tuple(c), lay) for n, k, c, lay in d["captures"]], dict(d["skipped"]),
                   set(d["mutable"]))


def layer_names(model: nn.Module, example: Any = None) -> list[str]:
    """Tappable names: ``"input"`` then every submodule, in execution order when ``example`` is given.

    Without an example input the order is registration order, which matches execution order for
    sequential models; with one (a tensor, a tuple for ``model(*x)`` or a dict for ``model(**x)``) the
    model is run once (eval mode, no grad) and only the modules that actually ran are listed, in the
    order their outputs were produced. A submodule that is itself named ``input`` is shadowed.
    """
    if example is None:
        return list(dict.fromkeys([INPUT] + [name for name, _ in model.named_modules() if name]))
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=name: order.append(n))
               for name, m in model.named_modules() if name]
    try:
        with frozen(model):
            Batch(example, torch.zeros(0)).call(model)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys([INPUT, *order]))


def residual_stream(model: nn.Module) -> list[str]:
    """The residual stream of a transformer: the input of its first block (the embeddings) and the output of every
    block, the blocks being the largest ``ModuleList``/``Sequential`` of two or more modules of one class."""
    best, size = None, 0
    for name, m in model.named_modules():
        kids = list(m.children())
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(kids) < 2 or len({type(k) for k in kids}) != 1:
            continue
        if not any(True for _ in kids[0].children()):
            continue  # a list of leaves (heads, norms) is not a stack of blocks
        params = sum(p.numel() for p in m.parameters())
        if params > size:
            best, size = name, params
    if best is None:
        raise LayerSelectionError(
            f"layers='residual' found no stack of blocks in {type(model).__name__} (a ModuleList or Sequential of two "
            "or more modules of one class, each with submodules); name the blocks instead, e.g. layers='layers.*'")
    count = len(list(model.get_submodule(best).children()))
    return [f"{best}.0:input", *(f"{best}.{i}" for i in range(count))]


def resolve_layers(model: nn.Module, layers: LayerSpec) -> list[str]:
    """Turn a layer spec into target names (``"input"``, module names, ``name:input``, ``name#k``), without duplicates.

    ``"all"`` means the input and every module (which of them give probe-able outputs is found by running
    the model); ``"residual"`` the residual stream (``residual_stream``). A glob's ``*`` stays within one
    dotted component and ``**`` crosses dots, so ``"layer*.relu"`` matches ``layer1.relu`` only.
    """
    return [t.name for t in resolve_targets(model, layers)]


def resolve_targets(model: nn.Module, layers: LayerSpec) -> list[Target]:
    """The targets of a layer spec; named ones are ``explicit`` (an error if they cannot be probed), those matched
    by ``"all"``, a pattern or a type are skipped with a reason instead."""
    modules = dict(model.named_modules())
    del modules[""]
    specs = [layers] if isinstance(layers, (str, type)) else list(layers) if isinstance(layers, Sequence) else None
    if specs is None or any(not isinstance(s, (str, type)) for s in specs):
        bad = layers if specs is None else next(s for s in specs if not isinstance(s, (str, type)))
        raise LayerSelectionError(
            f"layers must be names, glob patterns, module types, 'all' or 'residual', got {bad!r} "
            f"({type(bad).__name__}); for positions use names, e.g. linprobe.layer_names(model)[i]")
    if not specs:
        raise LayerSelectionError("no layers requested: pass a name, pattern, module type, 'all' or 'residual'")
    chosen: dict[str, Target] = {}
    for spec in specs:
        for target in _match(model, spec, modules):
            chosen.setdefault(target.name, target)
    return list(chosen.values())


def _match(model: nn.Module, spec: str | type[nn.Module], modules: Mapping[str, nn.Module]) -> list[Target]:
    """Targets matched by one spec, in registration order; raises with close matches on no match."""
    names = [INPUT, *modules]
    if isinstance(spec, type):
        found = [Target(n, explicit=False) for n, m in modules.items() if isinstance(m, spec)]
        if not found:
            kinds = sorted({type(m).__name__ for m in modules.values()})
            raise LayerSelectionError(f"no module of type {spec.__name__}; the model has: {', '.join(kinds)}")
        return found
    if spec == "all":
        return [Target("", "input", explicit=False)] + [Target(n, explicit=False) for n in modules]
    if spec == "residual":
        return [_parse(model, n, modules) for n in residual_stream(model)]
    if any(c in spec for c in "*?[") and "#" not in spec:
        regex = _glob_regex(spec)
        found = [_parse(model, n, modules, explicit=False) for n in names if regex.fullmatch(n)]
        if found:
            return found
        raise LayerSelectionError(f"pattern {spec!r} matches no layer; {_closest(spec, names)}")
    return [_parse(model, spec, modules)]


def _parse(model: nn.Module, name: str, modules: Mapping[str, nn.Module], explicit: bool = True) -> Target:
    """A target from ``module``, ``module:input`` or ``module#k`` (``input`` is the model's input)."""
    base, _, call = name.partition("#")
    if call and not call.isdigit():
        raise LayerSelectionError(f"{name!r}: the call after '#' must be a number (0 for the first call)")
    base, _, port = base.partition(":")
    if port and port != "input":
        raise LayerSelectionError(f"{name!r}: only ':input' may follow a module name (its first input)")
    kind: Literal["output", "input"] = "input" if port or base == INPUT else "output"
    module = "" if base == INPUT else base
    if module and module not in modules:
        raise LayerSelectionError(f"unknown layer {base!r}; {_closest(base, [INPUT, *modules])}")
    return Target(module, kind, int(call) if call else None, explicit)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a dotted-name glob: ``**`` any text, ``*`` any text without dots, ``?`` one non-dot."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = pattern[i]
        out.append({"*": "[^.]*", "?": "[^.]"}.get(c, re.escape(c)))
        i += 1
    return re.compile("".join(out))


def _closest(name: str, names: Sequence[str]) -> str:
    """A hint listing the existing names nearest to ``name`` (see ``linprobe.layer_names``)."""
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    if not close:
        close = [n for n in names if name.split(".")[-1].strip("*?") in n][:5]
    hint = f"closest: {', '.join(close)}" if close else f"{len(names)} names exist"
    return hint + " (linprobe.layer_names(model) lists them all)"


def default_select(output: Any) -> torch.Tensor | None:
    """The tensor a tap keeps from a module's output.

    A tensor is kept as is; a tuple or list gives its first tensor (an LSTM's ``output`` rather
    than ``(h, c)``); a dict-like gives ``last_hidden_state`` when present, else its first tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("last_hidden_state"), torch.Tensor):
            return cast(torch.Tensor, output["last_hidden_state"])
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def check_tokens(how: Any) -> None:
    """Refuse an unknown ``tokens=`` value at once, not when the first sequence output appears."""
    if how not in TOKEN_REDUCTIONS:
        raise ValueError(f"tokens must be 'auto', 'mean', 'first', 'last' or 'none', not {how!r}")


def reduce_tokens(h: torch.Tensor, how: TokenReduction, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Collapse the token axis of a (B, T, D) sequence output: the mean over real tokens, or the first or last real
    token (``mask`` (B, T), True for real tokens; left and right padding alike). ``"auto"`` is the masked mean when
    there is a mask and the output as is otherwise; ``"none"`` keeps every token."""
    check_tokens(how)
    if how in (None, "none") or h.dim() != 3 or (how == "auto" and mask is None):
        return h
    if mask is None:
        return h.mean(dim=1) if how == "mean" else h[:, 0 if how == "first" else -1]
    if mask.shape != h.shape[:2]:
        raise LayerSelectionError(f"a sequence output of shape {tuple(h.shape)} does not match the token mask "
                                  f"{tuple(mask.shape)}: tokens= needs outputs (batch, tokens, features)")
    m = mask.to(h.device)
    if how in ("mean", "auto"):
        w = m.to(h.dtype if h.is_floating_point() else torch.float32)
        return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    at = torch.where(m, positions, m.shape[1] if how == "first" else -1)
    index = at.min(1).values if how == "first" else at.max(1).values
    if bool((index < 0).any() | (index >= m.shape[1]).any()):
        raise ValueError("a sequence in the batch has no real token (its attention mask is all zeros)")
    return h[torch.arange(len(h), device=h.device), index.to(h.device)]


@dataclass
class _Record:
    """One hooked call in the discovery forward: a copy of its tensor, the original's identity and layout."""

    key: tuple[str, str]
    call: int
    tensor: torch.Tensor | None
    original: torch.Tensor | None
    identity: tuple[Any, ...] | None
    layout: Literal["tokens", "channels_first"]
    error: str | None = None


class Taps:
    """Forward hooks that hold, for each planned capture, its features from the latest forward pass.

    Use as a context manager (hooks are removed on exit, even when the forward raises). ``run(batch)``
    forwards and returns the features in execution order; ``collect()`` returns those of a forward the
    caller ran. With ``stop_early`` the forward is cut once every capture is taken (only for a frozen
    model, whose outputs nobody needs).

    A module called several times in one forward gives one capture per call (``name#0``, ``name#1``, ...)
    with ``repeat="each"`` (the default); ``"first"`` or ``"last"`` keep one call; ``"all"`` concatenates
    the calls' flattened outputs in call order; ``"error"`` refuses. With ``sink`` set, ``sink(name, features)``
    receives each capture of a planned forward in execution order and ``run``/``collect`` return nothing.
    """

    def __init__(self, model: nn.Module, layers: LayerSpec, *, select: Selector | Mapping[str, Selector] | None = None,
                 tokens: TokenReduction = "auto", repeat: RepeatPolicy = "each") -> None:
        if repeat not in REPEAT_POLICIES:
            raise ValueError(f"repeat must be 'each', 'error', 'first', 'last' or 'all', not {repeat!r}")
        check_tokens(tokens)
        self.model = model
        self.targets = resolve_targets(model, layers)
        self.names = [t.name for t in self.targets]
        self.select = select
        self.tokens = tokens
        self.repeat = repeat
        self.stop_early = False
        self.plan: Plan | None = None
        self.reductions: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.features: dict[str, torch.Tensor] = {}
        self._batch: Batch | None = None
        self._pending: Batch | None = None
        self._calls: dict[tuple[str, str], int] = {}
        self._records: list[_Record] = []
        self._wanted: dict[tuple[tuple[str, str], int], Capture] = {}
        self._wanted_for: Plan | None = None
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._sunk: set[str] = set()
        self.sink: Callable[[str, torch.Tensor], None] | None = None
        self._watch: list[tuple[str, torch.Tensor, int]] = []
        self._left = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def order(self) -> list[str]:
        """Capture names in execution order (empty before the first forward)."""
        return [c.name for c in self.plan.captures] if self.plan else []

    def __enter__(self) -> Taps:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def attach(self) -> None:
        """Register the hooks; idempotent."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        for key in dict.fromkeys(t.key for t in self.targets):
            module = modules[key[0]] if key[0] else self.model
            self._handles.append(module.register_forward_pre_hook(self._input_hook(key), with_kwargs=True)
                                 if key[1] == "input" else module.register_forward_hook(self._output_hook(key)))

    def remove(self) -> None:
        """Remove every hook this object added."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def run(self, batch: Batch | Any) -> dict[str, torch.Tensor]:
        """Forward a batch (or bare model inputs) and return the captured features in execution order. A capture
        found changed in place after the hook although it was not in the first forward is taken again, copied."""
        batch = batch if isinstance(batch, Batch) else Batch(batch, torch.zeros(_batch_size(batch)))
        for _ in range(2):
            self.expect(batch)
            try:
                batch.call(self.model)
            except _StopForward:
                pass
            try:
                return self.collect()
            except CaptureChanged:
                continue
        raise RuntimeError("captures kept changing in place between forwards; please report this model")

    def expect(self, batch: Batch) -> None:
        """Tell the taps which batch the next forward runs on (its size, token mask and token labels); without it
        they are read from the call (a keyword ``attention_mask`` is the token mask)."""
        self._pending = batch

    def collect(self) -> dict[str, torch.Tensor]:
        """The features of the latest forward in execution order (reduced when ``reductions`` are set)."""
        if not self._handles:
            raise RuntimeError("the taps are not attached, so no forward was recorded: use `with Taps(model, layers) "
                               "as taps:` or call taps.attach() before running the model")
        if self._records:
            self.plan = self._make_plan()
            self.features = self._discovered()
            self._records = []
        elif self.plan is None:
            raise RuntimeError("no forward of the model has run since the probes were attached: run the model on a "
                               "batch first, then collect its features")
        changed = [name for name, t, version in self._watch if t._version != version]
        if changed:
            self.plan.mutable.update(changed)
            raise CaptureChanged(f"the output of {', '.join(changed[:3])} was changed in place after its hook in this "
                                 "forward (not in the first one): it is copied from the next forward on")
        for name, parts in self._parts.items():
            self.features[name] = _joined(parts)
        missing = [c.name for c in self.plan.captures if c.name not in self.features and c.name not in self._sunk]
        if missing:
            raise LayerSelectionError(
                f"layer(s) {', '.join(missing[:5])} did not run in this forward pass although they ran in the first "
                "one (a data-dependent path?): probe layers that run on every batch")
        if self.sink is not None:
            for name in [n for n in self.order if n in self.features]:
                self.sink(name, self.features.pop(name))
            return {}
        return {name: self.features[name] for name in self.order}

    # hooks -----------------------------------------------------------------------------------------------------

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A new forward of the model: forget the last one's features."""
        self.features, self._calls, self._parts, self._watch, self._sunk = {}, {}, {}, [], set()
        self._records = []
        self._batch, self._pending = self._pending or _call_batch(args, kwargs), None
        if self.plan is not None:
            if self._wanted_for is not self.plan:  # built once per plan, not per forward
                self._wanted = {(c.key, k): c for c in self.plan.captures for k in c.calls}
                self._wanted_for = self.plan
            self._left = len(self._wanted)

    def _input_hook(self, key: tuple[str, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if tensor is None:
                kw = kwargs.get("hidden_states", kwargs.get("input_ids"))
                tensor = kw if isinstance(kw, torch.Tensor) else next(
                    (v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            self._take(key, module, tensor, tensor)
        return hook

    def _output_hook(self, key: tuple[str, str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._take(key, module, output, args[0] if args else None)
        return hook

    def _take(self, key: tuple[str, str], module: nn.Module, output: Any, first_input: Any) -> None:
        """One hooked call: recorded (first forward), or taken as planned: selected, detached, token-reduced,
        reduced, then handed to the sink or kept (copied if the model changes it in place later). Tensors are
        detached first, so no autograd graph is built whatever the caller's grad mode."""
        call = self._calls[key] = self._calls.get(key, -1) + 1
        if self.plan is None:
            self._discover(key, call, module, output, first_input)
            return
        capture = self._wanted.get((key, call))
        if capture is None:
            return
        tensor = self._selected(capture.name, output)
        h = self._finish(capture, self._tokens(tensor, capture.layout))
        self._left -= 1
        if self.sink is not None and len(capture.calls) == 1:
            self.sink(capture.name, h)  # consumed now, before anything later can change it
            self._sunk.add(capture.name)
        else:
            if h is tensor or h._is_view():  # it may share the output's memory (false positives only cost a copy)
                if capture.name in self.plan.mutable or self.sink is not None:
                    h = h.clone()
                else:
                    self._watch.append((capture.name, h, h._version))
            if len(capture.calls) > 1:
                self._parts.setdefault(capture.name, []).append(h)
            else:
                self.features[capture.name] = h
        if self.stop_early and self._left == 0:
            raise _StopForward

    # discovery -------------------------------------------------------------------------------------------------

    def _discover(self, key: tuple[str, str], call: int, module: nn.Module, output: Any, first_input: Any) -> None:
        """Record one call of a hooked module in the first forward: a copy of its tensor and how it is laid out
        (channels first for 1-D convolutions, pooling and norms, and what they pass on unchanged in shape)."""
        try:
            tensor = self._selected(_base_name(key), output)
        except LayerSelectionError as e:
            self._records.append(_Record(key, call, None, None, None, "tokens", str(e)))
            return
        layout: Literal["tokens", "channels_first"] = "tokens"
        source = self._source(first_input) if key[1] == "output" else None
        if isinstance(module, _CHANNELS_FIRST) and key[1] == "output":
            layout = "channels_first"
            if source is not None and source.key == ("", "input"):
                source.layout = "channels_first"  # the model's input feeds a 1-D convolution: (C, L)
        elif source is not None and source.layout == "channels_first" and first_input.shape == tensor.shape:
            layout = "channels_first"
        self._records.append(_Record(key, call, tensor.clone(), tensor, _identity(tensor), layout))

    def _source(self, first_input: Any) -> _Record | None:
        """The recorded output that a module received as its first input, if any."""
        if not isinstance(first_input, torch.Tensor) or first_input.is_nested:
            return None
        found = _identity(first_input)[:4]
        return next((r for r in reversed(self._records) if r.identity is not None and r.identity[:4] == found), None)

    def _make_plan(self) -> Plan:
        """Turn the discovery forward's records into captures; what cannot be probed is skipped with a reason, or
        an error for a layer named explicitly."""
        batch = self._batch
        assert batch is not None
        by_key: dict[tuple[str, str], list[_Record]] = {}
        for r in self._records:
            by_key.setdefault(r.key, []).append(r)
        plan = Plan([])
        seen: dict[tuple[Any, ...] | None, str] = {}
        position = {id(r): i for i, r in enumerate(self._records)}  # when each call's output was produced
        order: dict[str, int] = {}
        for key, records in by_key.items():
            for target in (t for t in self.targets if t.key == key):
                for name, calls, record in self._choose(target, records):
                    reason = self._unfit(record, batch, target.explicit)
                    same = _same_values(record)
                    if reason is None and not target.explicit and same in seen:
                        reason = f"the same tensor as {seen[same]}"
                    if reason is not None:
                        if target.explicit:
                            raise LayerSelectionError(f"layer {name!r} cannot be probed: {reason}")
                        plan.skipped[name] = reason
                        continue
                    seen.setdefault(same, name)
                    if record.original is not None and record.identity is not None \
                            and record.original._version != record.identity[-1]:
                        plan.mutable.add(name)
                    plan.captures.append(Capture(name, key, calls, record.layout))
                    order[name] = min(position[id(r)] for r in records if r.call in calls)
        missing = [t for t in self.targets if t.key not in by_key]
        named = [t.name for t in missing if t.explicit]
        if named:
            raise LayerSelectionError(
                f"layer(s) {', '.join(named)} did not run in the forward pass: they are never called by "
                f"{type(self.model).__name__}.forward (pick layers that run; linprobe.layer_names(model, example) "
                "lists them)")
        plan.skipped.update({t.name: "never ran in the forward pass" for t in missing})
        plan.captures.sort(key=lambda c: order[c.name])  # execution order, repeated calls where they happened
        if not plan.captures:
            raise LayerSelectionError(f"none of the requested layers gives a per-sample tensor to probe; skipped: "
                                      f"{_listing(plan.skipped)}")
        return plan

    def _choose(self, target: Target, records: list[_Record]) -> list[tuple[str, tuple[int, ...], _Record]]:
        """Per the repeat policy, the captures (name, calls, the record standing for them) made of a target's calls."""
        if target.call is not None:
            found = [r for r in records if r.call == target.call]
            if not found:
                raise LayerSelectionError(f"layer {target.name!r} asks for call {target.call} but the module ran "
                                          f"{len(records)} time(s) (calls are numbered from 0)")
            return [(target.name, (target.call,), found[0])]
        if len(records) == 1:
            return [(target.name, (0,), records[0])]
        if self.repeat == "error":
            raise LayerSelectionError(
                f"layer {target.name!r} ran {len(records)} times in one forward (a shared module or a loop); choose "
                "repeat='each' (a probe per call), 'first', 'last' or 'all' (concatenate the calls)")
        if self.repeat == "each":
            return [(f"{target.name}#{r.call}", (r.call,), r) for r in records]
        if self.repeat in ("first", "last"):
            r = records[0 if self.repeat == "first" else -1]
            return [(target.name, (r.call,), r)]
        calls = tuple(r.call for r in records)
        empty = next((r for r in records if r.tensor is None), None)
        if empty is not None:
            return [(target.name, calls, empty)]
        joined = _joined([self._tokens(cast(torch.Tensor, r.tensor), r.layout) for r in records])  # none empty
        return [(target.name, calls, _Record(target.key, 0, joined, None, _identity(joined), "tokens"))]

    def _unfit(self, record: _Record, batch: Batch, explicit: bool) -> str | None:
        """Why a recorded output cannot be probed, or None."""
        if record.tensor is None:
            return record.error or "no tensor in its output"
        t = record.tensor
        if t.dim() == 0 or t.shape[0] != batch.size:
            return (f"not per-sample: its output has shape {tuple(t.shape)} for a batch of {batch.size} (pick "
                    "another tensor with select=)")
        if not (t.is_floating_point() or t.is_complex()) and not explicit:
            return f"integer values ({t.dtype}, e.g. token ids), not features"
        if batch.token_level:
            tokens = batch.labels.shape[1]
            if t.dim() < 3 or t.shape[1] != tokens or record.layout != "tokens":
                return (f"no (batch, {tokens} tokens, features) output for the per-token labels: its output has shape "
                        f"{tuple(t.shape)}")
        elif self.tokens not in (None, "none", "auto") and t.dim() == 3 and batch.mask is not None \
                and t.shape[1] != batch.mask.shape[1]:
            return f"its sequence axis ({t.shape[1]}) does not match the token mask ({batch.mask.shape[1]})"
        return None

    def _discovered(self) -> dict[str, torch.Tensor]:
        """The discovery forward's features: its copies, token-reduced and reduced like a later forward's."""
        assert self.plan is not None
        index = {(*r.key, r.call): r for r in self._records}
        out: dict[str, torch.Tensor] = {}
        for c in self.plan.captures:
            out[c.name] = _joined([self._finish(c, self._tokens(cast(torch.Tensor, index[(*c.key, k)].tensor),
                                                                c.layout))  # planned captures hold a tensor
                                   for k in c.calls])
        return out

    # per-capture processing ------------------------------------------------------------------------------------

    def _selected(self, name: str, output: Any) -> torch.Tensor:
        """The detached tensor a tap keeps from one output; a clear error when there is none."""
        h: torch.Tensor | None
        if self.select is None and type(output) is torch.Tensor:  # the common case, on every hook: no lookups
            h = output
        else:
            base = name.partition("#")[0]
            select = self.select.get(base, default_select) if isinstance(self.select, Mapping) else self.select
            h = (select or default_select)(output)
            if not isinstance(h, torch.Tensor):
                raise LayerSelectionError(
                    f"layer {base!r} returned {type(output).__name__} with no tensor in it; pass "
                    f"select={{{base!r}: fn}} with a function that picks the tensor to probe")
        h = h.detach()
        return self._dense(h) if h.is_nested else h

    def _dense(self, h: torch.Tensor) -> torch.Tensor:
        """A nested (variable-length) tensor, as ``nn.TransformerEncoder`` makes of padded batches, padded with
        zeros to the batch's token mask."""
        mask = self._batch.mask if self._batch is not None else None
        if mask is not None and h.dim() == 3:
            width = h.unbind()[0].shape[-1]
            padded: torch.Tensor = torch.nested.to_padded_tensor(h, 0.0, output_size=(h.size(0), mask.shape[1], width))
            return padded
        padded = torch.nested.to_padded_tensor(h, 0.0)
        return padded

    def _tokens(self, h: torch.Tensor, layout: str) -> torch.Tensor:
        """Token-level rows (labelled tokens) or a token reduction, for a (B, T, ...) output in tokens layout."""
        batch = self._batch
        if batch is None or layout != "tokens" or h.dim() < 3:
            return h
        if batch.token_level:
            index = cast(torch.Tensor, batch.token_index)  # set for token-level labels
            return h[index.to(h.device)] if h.shape[:2] == index.shape else h
        mask = batch.mask if batch.mask is not None and h.dim() == 3 and h.shape[1] == batch.mask.shape[1] else None
        return reduce_tokens(h, self.tokens, mask)

    def _finish(self, capture: Capture, h: torch.Tensor) -> torch.Tensor:
        """The capture's reduction, when one is set."""
        reduction = self.reductions.get(capture.name)
        return reduction(h) if reduction is not None else h


def _base_name(key: tuple[str, str]) -> str:
    """The name of a hook's tensor: the module, ``input`` for the model's, ``module:input`` for a module's input."""
    module, kind = key
    return module if kind == "output" else f"{module}:input" if module else INPUT


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The calls of a repeated module as one capture: each call's output flattened, in call order."""
    return torch.cat([p.flatten(1) for p in parts], 1) if len(parts) > 1 else parts[0]


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two outputs the same values: storage, view and version."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


def _same_values(record: _Record) -> tuple[Any, ...] | None:
    """A key equal for outputs that hold the same values in the same order: the same memory and version, read
    contiguously (a view that only reshapes, such as ``nn.Flatten``'s, is the same features)."""
    if record.identity is None or record.original is None:
        return record.identity
    t = record.original
    return (record.identity[0], record.identity[1], t.numel(), t.is_contiguous(), t.dtype, record.identity[-1])


def _batch_size(inputs: Any) -> int:
    """Samples in model inputs: the first axis of their first tensor (0 when there is none)."""
    if isinstance(inputs, torch.Tensor):
        return len(inputs) if inputs.dim() else 0
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for v in values:
        n = _batch_size(v)
        if n:
            return n
    return 0


def _call_batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Batch:
    """What a forward called by someone else tells of its batch: its size and a keyword ``attention_mask``."""
    size = _batch_size((args, kwargs))
    mask = kwargs.get("attention_mask")
    mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 and len(mask) == size else None
    return Batch(None, torch.zeros(size), mask)


def _listing(skipped: Mapping[str, str]) -> str:
    items = [f"{n} ({why})" for n, why in list(skipped.items())[:6]]
    return "; ".join(items) + (f"; and {len(skipped) - 6} more" if len(skipped) > 6 else "")


def discovery_batch(batch: Batch) -> Batch:
    """The few samples the first, discovering forward runs on: enough to tell per-sample outputs from shared ones."""
    return batch.head(_DISCOVERY_BATCH)


def _training_flags(model: nn.Module) -> dict[str, bool]:
    """Every submodule's train/eval flag, so a temporary ``eval()`` can be undone exactly."""
    return {name: m.training for name, m in model.named_modules()}


def _restore_training_flags(model: nn.Module, flags: Mapping[str, bool]) -> None:
    """Put back the flags recorded by ``_training_flags``."""
    for name, m in model.named_modules():
        m.training = flags[name]


class frozen:
    """Context manager: the model in eval mode under ``torch.no_grad``, each module's mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags: dict[str, bool] = {}
        self._no_grad = torch.no_grad()

    def __enter__(self) -> nn.Module:
        self._flags = _training_flags(self.model)
        self.model.eval()
        self._no_grad.__enter__()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self._no_grad.__exit__(*exc)
        _restore_training_flags(self.model, self._flags)
