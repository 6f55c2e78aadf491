"""linprobe: linear classifier probes on every layer of any PyTorch model (Alain & Bengio).

The public API::

    layer_names(model, example=None)      the tappable names
    probe(model, train, valid, test=...)  a finished model, layer by layer -> ProbeResult
    probe_features(train, valid, test=...) activations you already have, probed the same way
    OnlineProbes(model, layers, ...)      probes that learn inside your training loop
    Monitor(model, layers, valid=..., every=k, exact=...)   probes over training: online and exact snapshots
    diagnose(result), save_timeline(result, out)           dead segments, lags, kinks; heatmap, animation
    sweep(factory, checkpoints, train, valid, out=...)     the probes of every saved checkpoint, resumable
    probe(..., tasks={"coarse": fn, "control": control_task(), "size": values(...)})   more label sets, one extraction
    paired_difference(correct_a, correct_b)                do two probes differ beyond noise on the same samples?
"""
from linprobe import models
from linprobe.capture.reduce import Flatten, Pool, Project, Subset
from linprobe.capture.taps import INPUT, LayerSelectionError, Taps, layer_names, residual_stream
from linprobe.data.datasets import ArrayDataset, group_split, load_dataset, standard_splits, stratified_split
from linprobe.data.inputs import InputSpec, Split
from linprobe.features import probe_features
from linprobe.finished import probe
from linprobe.fit.probes import LinearProbe, ProbeBank
from linprobe.fit.tasks import control_task, labels, shuffled_labels, values
from linprobe.fit.uncertainty import paired_difference
from linprobe.report.diagnose import describe, diagnose
from linprobe.report.results import ProbeResult
from linprobe.report.timeline import save_timeline
from linprobe.training.live import OnlineProbes
from linprobe.training.monitor import Monitor, online_exact_gap
from linprobe.training.sweeps import find_checkpoints, sweep

__version__ = "0.1.0"
__all__ = ["ArrayDataset", "Flatten", "INPUT", "InputSpec", "LayerSelectionError", "LinearProbe", "Monitor",
           "OnlineProbes", "Pool", "control_task", "labels", "paired_difference", "shuffled_labels", "values", "ProbeBank", "ProbeResult", "Project", "Subset", "Taps", "describe", "diagnose",
           "find_checkpoints", "layer_names",
           "load_dataset", "models", "online_exact_gap", "probe", "probe_features", "residual_stream", "save_timeline",
           "Split", "group_split", "standard_splits", "stratified_split", "sweep"]
