"""The diode diagrams (linprobe.report.diagram) and the diagram experiment that draws every paper model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import linprobe as lp
from linprobe.experiments import diagram, reproduce
from linprobe.experiments.report import verdict
from linprobe.models import MNIST_CONVNET_PROBES, inception_layout, mnist_convnet, small_inception
from linprobe.report.diagram import GAP, draw_model, elide, model_figure, model_layers, probe_colours, split_layout
from linprobe.report.plots import probe_colour
from linprobe.report.results import LayerInfo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["input", "conv", "relu", "fc"]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_draws_a_png_with_every_option(tmp_path: Path) -> None:
    path = draw_model([*NAMES, "head"], tmp_path / "d.png", errors={"input": 0.3, "conv": 0.2, "aux": 0.25},
                      probed=["input", "conv", "relu", "aux"], branches={"conv": ["aux"]}, skips={"input": "fc"},
                      shapes={"input": (1, 8, 8), "aux": (10,)}, chance=0.9, title="t")
    assert path == tmp_path / "d.png" and _is_png(path)


def test_plain_diagram_needs_no_errors_and_probes_every_layer_by_default(tmp_path: Path) -> None:
    assert _is_png(draw_model(NAMES, tmp_path / "plain.png"))
    assert _is_png(draw_model(NAMES, tmp_path / "equal.png", errors=dict.fromkeys(NAMES, 0.1), chance=0.5))


@pytest.mark.parametrize("kwargs, message", [
    ({"errors": {"conv": 0.1, "nope": 0.2}, "chance": 0.9}, "nope"),
    ({"errors": {"fc": 0.1}, "probed": ["conv"], "chance": 0.9}, "fc"),
    ({"errors": {GAP: 0.1}, "chance": 0.9}, GAP),
    ({"errors": {"conv": -0.1}, "chance": 0.9}, "finite"),
    ({"errors": {"conv": math.nan}, "chance": 0.9}, "finite"),
    ({"probed": ["input", "typo"]}, "typo"),
    ({"shapes": {"fcc": (3,)}}, "fcc"),
    ({"branches": {"missing": ["aux"]}}, "missing"),
    ({"branches": {"conv": []}}, "non-empty"),
    ({"branches": {"conv": ["relu"]}}, "distinct"),
    ({"skips": {"input": "later"}}, "later"),
    ({"errors": {"conv": 0.1}}, "chance"),
    ({"errors": {"conv": 0.1}, "chance": 0}, "chance"),
])
def test_rejects_bad_inputs_with_a_clear_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draw_model(NAMES, tmp_path / "bad.png", **kwargs)
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("names", [[], "input", ["input", "conv", "input"], ["input", ""]])
def test_rejects_bad_layer_lists(tmp_path: Path, names: object) -> None:
    with pytest.raises(ValueError):
        draw_model(names, tmp_path / "bad.png")  # type: ignore[arg-type]


def test_elide_replaces_each_run_of_left_out_layers_by_one_gap() -> None:
    names = ["input", *(f"layer{k}" for k in range(1, 9)), "head"]
    assert elide(names, {"input", "layer1", "layer5", "head"}) == ["input", "layer1", GAP, "layer5", GAP, "head"]
    assert elide(names, set(names)) == names
    with pytest.raises(ValueError, match="layer99"):
        elide(names, {"layer99"})


def test_split_layout_hangs_the_auxiliary_head_off_its_branch_point() -> None:
    model = small_inception()
    main, branches = split_layout(inception_layout(model))
    assert branches == {model.branch_point: ["aux_conv", "aux_head"]}
    assert main[0] == "input" and main[-1] == "logits" and len(main) + 2 == 17
    with pytest.raises(ValueError, match="role"):
        split_layout([("aux_head", "aux")])
    with pytest.raises(ValueError, match="role"):
        split_layout([("input", "main"), ("x", "side")])


def test_model_layers_are_the_top_level_modules_in_execution_order() -> None:
    names = model_layers(mnist_convnet(), torch.zeros(1, 1, 28, 28))
    assert names[0] == "input" and all("." not in n for n in names)
    assert [n for n in names if n in MNIST_CONVNET_PROBES] == list(MNIST_CONVNET_PROBES)
    assert {"flatten", "dropout"} <= set(names)


def test_probes_are_drawn_in_the_colour_of_their_error_on_the_one_scale() -> None:
    errors = {"input": 0.05, "conv": 0.45, "aux": 0.9}
    fig = model_figure([*NAMES, "head"], errors=errors, probed=["input", "conv", "relu", "aux"],
                       branches={"conv": ["aux"]}, chance=0.9)
    drawn = probe_colours(fig)
    assert list(drawn) == ["input", "conv", "relu", "aux"]  # one circle per probe, main path then branch
    assert {n: drawn[n] for n in errors} == {n: probe_colour(e, 0.9) for n, e in errors.items()}
    assert drawn["relu"] == (1.0, 1.0, 1.0, 1.0)  # probed, no error fed: white
    assert drawn["aux"] == probe_colour(0.9, 0.9) == probe_colour(1.0, 0.9)  # chance and worse: the same red


def test_diagram_experiment_draws_every_paper_model(tmp_path: Path) -> None:
    summary = reproduce("diagram", tmp_path, quick=True, progress=False)
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    layouts = meta["diagrams"]
    assert set(layouts) == {"mnist_convnet", "deep_mlp_skip", "small_resnet", "small_inception"}
    for name in layouts:
        assert _is_png(tmp_path / f"{name}.png"), name
    assert len(layouts["small_resnet"]["probed"]) == 17 and len(layouts["small_inception"]["probed"]) == 17
    assert layouts["small_inception"]["branches"] == {"mixed_4d": ["aux_conv", "aux_head"]}
    mlp = layouts["deep_mlp_skip"]
    assert GAP in mlp["names"] and mlp["skips"] == {"input": "layer64"} and "layer64" in mlp["probed"]
    assert layouts["small_resnet"]["shapes"]["add_16"] == [256, 2, 2]
    assert lp.ProbeResult.load(tmp_path).rows == []  # results.csv holds no rows: the numbers are the sources'
    assert summary.checks and summary.verdict in ("reproduced", "partly", "not")
    assert (tmp_path / "summary.md").is_file() and "wall time" in (tmp_path / "summary.md").read_text()
    _check_coloured(tmp_path, meta["coloured"], summary.figures)


def _check_coloured(out: Path, coloured: dict, figures: list[str]) -> None:
    """Each coloured diagram: written, listed, fed its source's test errors, drawn in probe_colour of them, one
    probe per drawn layer the source measured."""
    sources = {v: lp.ProbeResult.load(diagram.RESULTS / folder) for v, folder in diagram.SOURCES.items()}
    assert set(coloured) == {f"deep_mlp_{v}_step{s}.png" for v, r in sources.items() for s in r.steps}
    for name, record in coloured.items():
        source, layout = sources[record["variant"]], record["layout"]
        assert _is_png(out / name) and name in figures
        fed = source.errors("test", step=record["step"])
        assert record["errors"] == {n: pytest.approx(fed[n]) for n in layout["probed"]}
        assert record["chance"] == source.chance_error
        assert list(record["colours"]) == layout["probed"]
        for layer, colour in record["colours"].items():
            assert tuple(colour) == probe_colour(fed[layer], source.chance_error), (name, layer)
    skip = coloured["deep_mlp_skip_step5000.png"]["layout"]
    assert skip["skips"] == {"input": "layer64"} and {"layer63", "layer64", "layer65"} <= set(skip["probed"])
    assert len(skip["probed"]) == 1 + 1 + 16 + 2  # input, layer1, every 8th to 128, layers 63 and 65
    aux = coloured["deep_mlp_aux_step5000.png"]["layout"]
    assert aux["branches"] == {f"layer{k}": [f"aux_heads.layer{k}"] for k in range(16, 128, 16)}
    assert not set(aux["probed"]) & {h for b in aux["branches"].values() for h in b}  # guides carry no probe


def _deep_mlp(errors: dict[int, list[float]], *, depth: int = 16, model: float = 0.1) -> lp.ProbeResult:
    """A made-up deep-mlp run: per step the test error of the input and each layer, the model's own error."""
    names = ["input", *(f"layer{k}" for k in range(1, depth + 1))]
    shapes = {n: (1, 28, 28) if n == "input" else (16,) for n in names}
    result = lp.ProbeResult([LayerInfo(n, shapes[n], math.prod(shapes[n]), math.prod(shapes[n]), {"kind": "none"},
                                       0.9) for n in names])
    for step, values in errors.items():
        for name, value in zip(names, values):
            result.add(step, name, "test", {"top1_error": value})
    result.meta["model_test_error"] = {str(s): model for s in errors}
    return result


def test_diagnosis_checks_judge_the_numbers_the_diagrams_show() -> None:
    n = 1000
    dead = [0.1] + [0.6] * 7 + [0.1] * 9  # layers 1-7 useless, 8-16 (from the skip into layer 8) learned
    untrained = [0.1] + [0.5] * 7 + [0.2] + [0.5] * 8
    assert verdict(diagram.diagnosis_checks("skip", _deep_mlp({0: untrained, 500: dead}), n=n)) == "reproduced"
    alive = [0.1] * 17  # contradicting: every layer learned, no dead segment
    judged = diagram.diagnosis_checks("skip", _deep_mlp({0: untrained, 500: alive}), n=n)
    assert verdict(judged) == "not" and judged[0].claim.startswith("skip: ")
    guided = [0.1] * 17
    assert verdict(diagram.diagnosis_checks("aux", _deep_mlp({0: [0.9] * 17, 500: guided}), n=n)) == "reproduced"
    stuck = [0.1] + [0.3] * 12 + [0.85] * 4  # contradicting: the last quarter stays useless
    assert verdict(diagram.diagnosis_checks("aux", _deep_mlp({0: [0.9] * 17, 500: stuck}, model=0.85), n=n)) == "not"


def test_coloured_layout_of_a_made_up_run_draws_a_probe_on_each_kept_layer() -> None:
    run = _deep_mlp({0: [0.5] * 33}, depth=32)
    skip = diagram.coloured_layout("skip", run)
    assert skip["skips"] == {"input": "layer16"} and skip["names"][-1] == "classifier"
    assert skip["probed"] == [n for n in skip["names"] if n not in (GAP, "classifier")]
    assert {"layer15", "layer16", "layer17", "layer32"} <= set(skip["probed"])
    aux = diagram.coloured_layout("aux", run)
    assert aux["branches"] == {f"layer{k}": [f"aux_heads.layer{k}"] for k in range(4, 32, 4)}
    assert aux["shapes"]["aux_heads.layer4"] == [10]


def test_a_missing_source_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="reproduce deep-mlp --variant skip"):
        reproduce("diagram", tmp_path / "out", quick=True, progress=False, results_from=tmp_path)
