"""Hugging Face transformers (built from configs, random weights) and torch's own sequence models: dict batches,
padding on either side, the residual stream, per-token labels. Every number is checked against scikit-learn
fitted on the same masked, pooled ``output_hidden_states``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

import linprobe as lp
from linprobe.fit.solvers import sklearn_C

transformers = pytest.importorskip("transformers")

VOCAB, T, N = 40, 10, (360, 120, 120)
KW = dict(l2_path=(1.0, 0.1), progress=False, plot=False)


def _bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32)).eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32)).eval()


def _sequences(n: int, seed: int, side: str, positions: bool = False) -> dict[str, torch.Tensor]:
    """Token ids (1..VOCAB-1) of random lengths 3..T, padded with 0 on ``side``; ``positions`` adds position ids
    that count real tokens only (what left-padded GPT-2 needs)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    real = torch.arange(T)[None, :] < lengths[:, None]
    mask = real if side == "right" else real.flip(1)
    ids = torch.randint(1, VOCAB, (n, T), generator=g).masked_fill(~mask, 0)
    batch = {"input_ids": ids, "attention_mask": mask.long()}
    if positions:
        batch["position_ids"] = (mask.long().cumsum(1) - 1).clamp_min(0)
    return batch


def _last_token(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each sequence's last real token, found independently of linprobe."""
    last = torch.stack([torch.nonzero(row)[-1, 0] for row in mask])
    return h[torch.arange(len(h)), last]


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].float()
    return (h * m).sum(1) / m.sum(1)


def _hidden_states(model: nn.Module, x: dict[str, torch.Tensor], last_block: str) -> list[torch.Tensor]:
    """``output_hidden_states``, with the last entry replaced by the last block's own output (GPT-2 and Llama
    apply their final norm to it), captured by a plain forward hook."""
    got = {}
    handle = model.get_submodule(last_block).register_forward_hook(
        lambda m, a, out: got.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hs = list(model(**x, output_hidden_states=True).hidden_states)
    handle.remove()
    return hs[:-1] + [got["h"]]


def _sklearn_error(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], l2: float) -> float:
    scaler = StandardScaler().fit(train[0])
    clf = LogisticRegression(C=sklearn_C(l2, len(train[0])), max_iter=5000, tol=1e-8)
    clf.fit(scaler.transform(train[0]), train[1])
    return float(1 - clf.score(scaler.transform(test[0]), test[1]))


def _splits(side: str, positions: bool = False) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Sequence labels: the last real token's id modulo 3."""
    out = []
    for n, seed in zip(N, (1, 2, 3)):
        x = _sequences(n, seed, side, positions)
        out.append((x, _last_token(x["input_ids"][..., None], x["attention_mask"])[:, 0] % 3))
    return out


def _compare(model: nn.Module, splits, result: lp.ProbeResult, pool, last_block: str) -> list[float]:
    """Per residual-stream layer: |linprobe's test error - scikit-learn's on the same pooled hidden states|."""
    states = [_hidden_states(model, x, last_block) for x, _ in splits]
    names = [info.name for info in result.layers]
    gaps = []
    for i, name in enumerate(names):
        train, test = ((pool(states[k][i], splits[k][0]["attention_mask"]).numpy(), splits[k][1].numpy())
                       for k in (0, 2))
        gaps.append(abs(result.errors("test")[name] - _sklearn_error(train, test, result.layers[i].l2)))
    return gaps


@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_last_real_token_matches_sklearn(tmp_path, side):
    model, splits = _bert(), _splits(side)
    result = lp.probe(model, *splits[:2], test=splits[2], layers="residual", tokens="last", cache_dir=tmp_path, **KW)
    assert [i.name for i in result.layers] == ["encoder.layer.0:input", "encoder.layer.0", "encoder.layer.1"]
    assert max(_compare(model, splits, result, _last_token, "encoder.layer.1")) <= 0.005
    assert result.errors("test")["encoder.layer.0:input"] < 0.35  # the token's identity is in its embedding


def test_bert_default_tokens_is_the_masked_mean_and_pads_would_have_misled(tmp_path):
    model, splits = _bert(), _splits("right")
    result = lp.probe(model, *splits[:2], test=splits[2], layers="residual", cache_dir=tmp_path, **KW)
    assert max(_compare(model, splits, result, _masked_mean, "encoder.layer.1")) <= 0.005
    last = lp.probe(model, *splits[:2], test=splits[2], layers="residual", tokens="last", cache_dir=tmp_path, **KW)
    states = [_hidden_states(model, x, "encoder.layer.1") for x, _ in splits]
    pad = _sklearn_error((states[0][0][:, -1].numpy(), splits[0][1].numpy()),
                         (states[2][0][:, -1].numpy(), splits[2][1].numpy()), 0.1)
    assert pad > last.errors("test")["encoder.layer.0:input"] + 0.2  # the position T-1 is a pad for most rows


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_residual_stream_left_padded_matches_sklearn(tmp_path, family):
    model = _gpt2() if family == "gpt2" else _llama()
    blocks = "h" if family == "gpt2" else "layers"
    splits = _splits("left", positions=True)
    result = lp.probe(model, *splits[:2], test=splits[2], layers="residual", tokens="last", cache_dir=tmp_path, **KW)
    assert [i.name for i in result.layers] == [f"{blocks}.0:input", f"{blocks}.0", f"{blocks}.1"]
    assert max(_compare(model, splits, result, _last_token, f"{blocks}.1")) <= 0.005


def test_token_level_labels_probe_every_labelled_token(tmp_path):
    model = _bert()
    splits = []
    for n, seed in zip(N, (1, 2, 3)):
        x = _sequences(n, seed, "right")
        labels = (x["input_ids"] % 3).masked_fill(x["attention_mask"] == 0, -100)
        splits.append((x, labels))
    result = lp.probe(model, *splits[:2], test=splits[2], layers="residual", cache_dir=tmp_path, **KW)
    tokens = int((splits[0][1] != -100).sum())
    manifest = json.loads((Path(result.meta["cache"]) / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == tokens  # one row per labelled token
    states = [_hidden_states(model, x, "encoder.layer.1") for x, _ in splits]
    for i, info in enumerate(result.layers):
        keep = [s[1] != -100 for s in splits]
        train = (states[0][i][keep[0]].numpy(), splits[0][1][keep[0]].numpy())
        test = (states[2][i][keep[2]].numpy(), splits[2][1][keep[2]].numpy())
        assert len(train[0]) == tokens
        assert abs(result.errors("test")[info.name] - _sklearn_error(train, test, info.l2)) <= 0.005
    assert result.errors("test")["encoder.layer.0:input"] < 0.3  # chance: about 0.66


@pytest.mark.parametrize("build", [_bert, _gpt2])
def test_all_runs_with_defaults_and_reports_what_it_skipped(tmp_path, build):
    model = build()
    splits = _splits("right")
    result = lp.probe(model, *splits[:2], test=splits[2], layers="all", cache_dir=tmp_path, **KW)
    skipped = result.meta["skipped"]
    assert skipped["input"].startswith("integer values")
    assert any(why == "never ran in the forward pass" for why in skipped.values())
    assert any(why.startswith("not per-sample") for why in skipped.values())  # position embeddings (1, T, D)
    assert len(result.layers) >= 10 and all(0 <= e <= 1 for e in result.errors("test").values())
    if build is _gpt2:  # pre-LN: the residual stream is the blocks' own outputs, which no leaf module gives
        assert {"h.0", "h.1"} <= set(result.errors("test"))


class _Encoder(nn.Module):
    """Embedding + ``nn.TransformerEncoder`` (padding given as a key padding mask) + a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(h[:, 0])


class _Recurrent(nn.Module):
    """Embedding + LSTM (batch first) + a head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(input_ids))[0][:, -1])


@pytest.mark.parametrize("build, layer", [(_Encoder, "encoder"), (_Recurrent, "lstm")])
def test_torch_sequence_models_all_with_defaults(tmp_path, build, layer):
    model, splits = build().eval(), _splits("right")
    result = lp.probe(model, *splits[:2], test=splits[2], layers="all", cache_dir=tmp_path, **KW)
    assert layer in result.errors("test") or any(n.startswith(layer) for n in result.errors("test"))
    outputs = []
    for x, _ in splits:
        got = {}
        handle = model.get_submodule(layer).register_forward_hook(
            lambda m, a, out: got.__setitem__("h", out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            model(**x)
        handle.remove()
        outputs.append(_masked_mean(got["h"], x["attention_mask"]))
    name = layer if layer in result.errors("test") else next(n for n in result.errors("test") if n.startswith(layer))
    info = next(i for i in result.layers if i.name == name)
    want = _sklearn_error((outputs[0].numpy(), splits[0][1].numpy()), (outputs[2].numpy(), splits[2][1].numpy()),
                          info.l2)
    assert abs(result.errors("test")[name] - want) <= 0.005


def test_bring_your_own_hidden_states_gives_the_same_numbers(tmp_path):
    model, splits = _bert(), _splits("right")
    direct = lp.probe(model, *splits[:2], test=splits[2], layers="residual", tokens="last", cache_dir=tmp_path / "a",
                      **KW)
    parts = []
    for x, y in splits:
        with torch.no_grad():
            states = model(**x, output_hidden_states=True).hidden_states
        parts.append(({f"hidden_states.{i}": h for i, h in enumerate(states)}, y, x["attention_mask"]))
    own = lp.probe_features(*parts[:2], test=parts[2], tokens="last", out_dir=tmp_path / "b", **KW)
    assert [i.name for i in own.layers] == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    assert list(own.errors("test").values()) == list(direct.errors("test").values())
    assert (tmp_path / "b" / "results.csv").is_file() and (tmp_path / "b" / "probes" / "config.json").is_file()
    with pytest.raises(ValueError, match="reserved"):
        lp.probe_features(({"input": parts[0][0]["hidden_states.0"]}, parts[0][1]), parts[1])
