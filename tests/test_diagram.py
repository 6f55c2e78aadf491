"""The diode diagrams (linprobe.report.diagram) and the diagram experiment that draws every paper model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import linprobe as lp
from linprobe.experiments import reproduce
from linprobe.models import MNIST_CONVNET_PROBES, inception_layout, mnist_convnet, small_inception
from linprobe.report.diagram import GAP, draw_model, elide, model_layers, split_layout

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


def test_diagram_experiment_draws_every_paper_model(tmp_path: Path) -> None:
    summary = reproduce("diagram", tmp_path, quick=True, progress=False)
    layouts = json.loads((tmp_path / "results.json").read_text())["meta"]["diagrams"]
    assert set(layouts) == {"mnist_convnet", "deep_mlp_skip", "small_resnet", "small_inception"}
    for name in layouts:
        assert _is_png(tmp_path / f"{name}.png"), name
    assert len(layouts["small_resnet"]["probed"]) == 17 and len(layouts["small_inception"]["probed"]) == 17
    assert layouts["small_inception"]["branches"] == {"mixed_4d": ["aux_conv", "aux_head"]}
    mlp = layouts["deep_mlp_skip"]
    assert GAP in mlp["names"] and mlp["skips"] == {"input": "layer64"} and "layer64" in mlp["probed"]
    assert layouts["small_resnet"]["shapes"]["add_16"] == [256, 2, 2]
    assert lp.ProbeResult.load(tmp_path).rows == []  # nothing is measured
    assert summary.verdict is None and summary.checks == [] and (tmp_path / "summary.md").is_file()
