"""linprobe: linear classifier probes on every layer of any PyTorch model (Alain & Bengio).

The public API::

    layer_names(model, example=None)      the tappable names
    probe(model, train, valid, test=...)  a finished model, layer by layer -> ProbeResult
    OnlineProbes(model, layers, ...)      probes that learn inside your training loop
"""
from linprobe import models
from linprobe.data import ArrayDataset, load_dataset, standard_splits
from linprobe.finished import probe
from linprobe.live import OnlineProbes
from linprobe.probes import LinearProbe, ProbeBank
from linprobe.reduce import Flatten, Pool, Project, Subset
from linprobe.results import ProbeResult
from linprobe.taps import INPUT, LayerSelectionError, Taps, layer_names

__version__ = "0.1.0"
__all__ = ["ArrayDataset", "Flatten", "INPUT", "LayerSelectionError", "LinearProbe", "OnlineProbes", "Pool",
           "ProbeBank", "ProbeResult", "Project", "Subset", "Taps", "layer_names", "load_dataset", "models", "probe",
           "standard_splits"]
