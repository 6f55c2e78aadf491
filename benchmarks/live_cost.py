"""Live probing cost: a training step with probes learning on every tap, against the bare training step.

Contenders, each on its own copy of the model, stepped round-robin on the same batches:

* ``bare``: the training step alone;
* ``linprobe``: the step, then ``OnlineProbes.step(y)`` on the features of that same forward;
* ``extra forward``: the common callback design, a second (no-grad) forward per step to feed the probes;
* ``loop per probe``: the course reproduction's design, one loop per probe, each with its own forward.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch

import linprobe as lp
from benchmarks.fixtures import Case, batch, convnet, fashion, mlp, train_step
from benchmarks.timing import Row, interleaved

TARGETS = {"convnet": 1.10, "mlp128": 1.25}


def contenders(case: Case) -> dict[str, Callable[[int], None]]:
    """One step function per contender, each owning a copy of the model and its optimiser."""
    def copy_of() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = copy.deepcopy(case.model).train()
        return model, case.optimizer(model)

    def data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch(case.splits["train"], case.batch_size, i)

    bare, bare_opt = copy_of()
    live, live_opt = copy_of()
    probes = lp.OnlineProbes(live, case.layers, num_classes=10)
    extra, extra_opt = copy_of()
    extra_probes = lp.OnlineProbes(extra, case.layers, num_classes=10)
    loop, loop_opt = copy_of()
    per_layer = [lp.OnlineProbes(loop, [name], num_classes=10) for name in case.layers]
    for p in per_layer:
        p.close()  # each loop attaches its hooks for its own forward only

    def with_probes(i: int) -> None:
        x, y = data(i)
        train_step(live, live_opt, x, y)
        probes.step(y)

    def with_extra_forward(i: int) -> None:
        x, y = data(i)
        train_step(extra, extra_opt, x, y)
        with torch.no_grad():
            extra(x)
        extra_probes.step(y)

    def loop_per_probe(i: int) -> None:
        x, y = data(i)
        train_step(loop, loop_opt, x, y)
        for p in per_layer:
            p.taps.attach()
            with torch.no_grad():
                loop(x)
            p.step(y)
            p.taps.remove()

    return {"bare": lambda i: train_step(bare, bare_opt, *data(i)), "linprobe": with_probes,
            "extra forward": with_extra_forward, "loop per probe": loop_per_probe}


def run(quick: bool) -> tuple[list[Row], str]:
    """Per case, each contender's median step time as a multiple of the bare step."""
    cases = [convnet(fashion(2000, 200, 200), train_steps=0), mlp(depth=16 if quick else 128, train_steps=0)]
    rows = []
    for case in cases:
        fast = 5 if quick else 40
        repeats = {"bare": fast, "linprobe": fast, "extra forward": fast, "loop per probe": 1 if quick else 3}
        times = interleaved(contenders(case), repeats, warmup=1 if quick else 3)
        label = f"{case.name} ({len(case.layers)} taps, batch {case.batch_size})"
        for name, t in times.items():
            row = Row("1 live", label, name, t * 1e3, "ms/step", t / times["bare"], "bare step")
            if name == "linprobe" and case.name in TARGETS:
                row.target, row.met = f"<= {TARGETS[case.name]:.2f}x", row.ratio <= TARGETS[case.name]
            rows.append(row)
    return rows, ""
