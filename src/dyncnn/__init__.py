"""dyncnn: efficient mobile CNN backbones and dynamic networks that execute the computation they save."""
from .errors import CheckpointError, DyncnnError, check_image_batch
from .models import create_model, list_models, register_model
from .profile import count_macs, count_params, measure_latency, peak_memory

__version__ = "0.1.0"

__all__ = [
    "create_model", "list_models", "register_model", "count_macs", "count_params", "measure_latency",
    "peak_memory", "DyncnnError", "CheckpointError", "check_image_batch", "__version__",
]
