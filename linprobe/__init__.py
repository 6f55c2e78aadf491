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
from linprobe.data import ArrayDataset, load_dataset, standard_splits
from linprobe.diagnose import describe, diagnose
from linprobe.features import probe_features
from linprobe.finished import probe
from linprobe.inputs import InputSpec, Split
from linprobe.live import OnlineProbes
from linprobe.monitor import Monitor, online_exact_gap
from linprobe.probes import LinearProbe, ProbeBank
from linprobe.reduce import Flatten, Pool, Project, Subset
from linprobe.results import ProbeResult
from linprobe.sweeps import find_checkpoints, sweep
from linprobe.tasks import control_task, labels, shuffled_labels, values
from linprobe.uncertainty import paired_difference
from linprobe.taps import INPUT, LayerSelectionError, Taps, layer_names, residual_stream
from linprobe.timeline import save_timeline

__version__ = "0.1.0"
__all__ = ["ArrayDataset", "Flatten", "INPUT", "InputSpec", "LayerSelectionError", "LinearProbe", "Monitor",
           "OnlineProbes", "Pool", "control_task", "labels", "paired_difference", "shuffled_labels", "values", "ProbeBank", "ProbeResult", "Project", "Subset", "Taps", "describe", "diagnose",
           "find_checkpoints", "layer_names",
           "load_dataset", "models", "online_exact_gap", "probe", "probe_features", "residual_stream", "save_timeline",
           "Split", "standard_splits", "sweep"]
