"""Taps: choose layers of any ``nn.Module`` and capture their outputs, detached, with forward hooks.

A layer is addressed by its dotted module name, a glob pattern, a module type or ``"all"``;
``"input"`` is the model's own input (the paper's layer 0). Captured outputs are detached at the
hook, so nothing downstream of a tap can send a gradient back into the model (the paper's diode).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

INPUT = "input"
LayerSpec = str | type[nn.Module] | Sequence[str | type[nn.Module]]
Selector = Callable[[Any], torch.Tensor]
TokenReduction = Literal["mean", "first", "last"] | None
RepeatPolicy = Literal["error", "first", "last", "all"]


class LayerSelectionError(ValueError):
    """A requested layer does not exist, matches nothing or cannot be captured."""


class _StopForward(Exception):
    """Raised from a hook once every requested layer is captured: the rest of the forward is waste."""


def layer_names(model: nn.Module, example: Any = None) -> list[str]:
    """Tappable names: ``"input"`` then every submodule, in execution order when ``example`` is given.

    Without an example input the order is registration order, which matches execution order for
    sequential models; with one, the model is run once (eval mode, no grad) and only the modules
    that actually ran are listed, in the order their outputs were produced. A submodule that
    is itself named ``input`` is shadowed by the model's input.
    """
    if example is None:
        return list(dict.fromkeys([INPUT] + [name for name, _ in model.named_modules() if name]))
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=name: order.append(n))
               for name, m in model.named_modules() if name]
    try:
        with frozen(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys([INPUT, *order]))


def resolve_layers(model: nn.Module, layers: LayerSpec) -> list[str]:
    """Turn a layer spec into a list of module names (plus ``"input"``), without duplicates.

    ``"all"`` means the input and every leaf module. A glob's ``*`` stays within one dotted
    component and ``**`` crosses dots, so ``"layer*.relu"`` matches ``layer1.relu`` only.
    """
    modules = dict(model.named_modules())
    del modules[""]
    specs = [layers] if isinstance(layers, (str, type)) else list(layers)
    if not specs:
        raise LayerSelectionError("no layers requested: pass a name, pattern, module type or 'all'")
    chosen: list[str] = []
    for spec in specs:
        chosen.extend(_match(spec, modules))
    return list(dict.fromkeys(chosen))


def _match(spec: str | type[nn.Module], modules: Mapping[str, nn.Module]) -> list[str]:
    """Names matched by one spec, in registration order; raises with close matches on no match."""
    names = [INPUT, *modules]
    if isinstance(spec, type):
        found = [n for n, m in modules.items() if isinstance(m, spec)]
        if not found:
            kinds = sorted({type(m).__name__ for m in modules.values()})
            raise LayerSelectionError(f"no module of type {spec.__name__}; the model has: {', '.join(kinds)}")
        return found
    if spec == "all":
        return [INPUT] + [n for n, m in modules.items() if not any(True for _ in m.children())]
    if spec in names:
        return [spec]
    if any(c in spec for c in "*?["):
        regex = _glob_regex(spec)
        found = [n for n in names if regex.fullmatch(n)]
        if found:
            return found
        raise LayerSelectionError(f"pattern {spec!r} matches no layer; {_closest(spec, names)}")
    raise LayerSelectionError(f"unknown layer {spec!r}; {_closest(spec, names)}")


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
            return output["last_hidden_state"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def reduce_tokens(h: torch.Tensor, how: TokenReduction) -> torch.Tensor:
    """Collapse the token axis of a (B, T, D) sequence output: mean, first or last token."""
    if how is None or h.dim() != 3:
        return h
    if how == "mean":
        return h.mean(dim=1)
    if how in ("first", "last"):
        return h[:, 0 if how == "first" else -1]
    raise ValueError(f"tokens must be 'mean', 'first', 'last' or None, not {how!r}")


class Taps:
    """Forward hooks that hold, for each chosen layer, its output from the latest forward pass.

    Use as a context manager (hooks are removed on exit, even when the forward raises).
    ``features`` maps layer name to a detached tensor of shape (batch, ...). ``order`` is the
    execution order learned from the first forward. With ``stop_early`` the forward is cut once
    every layer has been captured (only for a frozen model, whose outputs nobody needs).

    A module called several times in one forward is an error unless ``repeat`` says which call to
    keep: ``"first"``, ``"last"``, or ``"all"`` (the calls' outputs flattened and concatenated in call
    order, ``(B, calls * features)``; a single call is kept as is).
    """

    def __init__(self, model: nn.Module, layers: LayerSpec, *, select: Selector | Mapping[str, Selector] | None = None,
                 tokens: TokenReduction = None, repeat: RepeatPolicy = "error") -> None:
        if repeat not in ("error", "first", "last", "all"):
            raise ValueError(f"repeat must be 'error', 'first', 'last' or 'all', not {repeat!r}")
        self.model = model
        self.names = resolve_layers(model, layers)
        self.select = select
        self.tokens = tokens
        self.repeat = repeat
        self.stop_early = False
        self.features: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self._seen: dict[str, int] = {}
        self._calls: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

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
        self._handles.append(self.model.register_forward_pre_hook(self._on_input))
        for name in self.names:
            if name != INPUT:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def remove(self) -> None:
        """Remove every hook this object added."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def run(self, x: Any) -> dict[str, torch.Tensor]:
        """Forward ``x`` through the model and return the captured features in execution order."""
        try:
            self.model(x)
        except _StopForward:
            pass
        return self.collect()

    def collect(self) -> dict[str, torch.Tensor]:
        """The features of the latest forward in execution order; error if a layer never ran."""
        if not self._handles:
            raise RuntimeError("the taps are not attached, so no forward was recorded: use `with Taps(model, layers) "
                               "as taps:` or call taps.attach() before running the model")
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise LayerSelectionError(
                f"layer(s) {', '.join(missing)} did not run in the forward pass: they are never called by "
                f"{type(self.model).__name__}.forward (pick layers that run; linprobe.layer_names(model, example) lists them)")
        if self.repeat == "all":
            self.features.update({n: torch.cat([h.flatten(1) for h in calls], 1)
                                  for n, calls in self._calls.items() if len(calls) > 1})
        if not self.order:
            self.order = list(self.features)
        return {n: self.features[n] for n in self.order}

    def _on_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features, self._seen, self._calls = {}, {}, {}
        if INPUT in self.names:
            self.features[INPUT] = self._select(INPUT, args[0] if args else None)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen = self._seen[name] = self._seen.get(name, 0) + 1
            if seen > 1 and self.repeat == "error":
                raise LayerSelectionError(
                    f"layer {name!r} ran {seen} times in one forward (a shared module or a loop); choose "
                    "repeat='first', 'last' or 'all' (concatenate the calls) to say which calls to probe")
            if seen > 1 and self.repeat == "first":
                return
            h = self._select(name, output)
            if self.repeat == "all":
                self._calls.setdefault(name, []).append(h)
            if seen == 1 or self.repeat == "last":
                self.features[name] = h
            if self.stop_early and self.repeat in ("error", "first") and len(self.features) == len(self.names):
                raise _StopForward
        return hook

    def _select(self, name: str, output: Any) -> torch.Tensor:
        """The detached, token-reduced tensor a tap keeps from one output; a clear error when there is none."""
        select = self.select.get(name, default_select) if isinstance(self.select, Mapping) else self.select
        h = (select or default_select)(output)
        if not isinstance(h, torch.Tensor):
            raise LayerSelectionError(
                f"layer {name!r} returned {type(output).__name__} with no tensor in it; pass select={{{name!r}: fn}} "
                "with a function that picks the tensor to probe")
        return reduce_tokens(h.detach(), self.tokens)


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
