"""Joint training of the IFPruning mask predictor (and optionally the LLM).

    ifp-compile train --config CONFIG                    one process
    torchrun --nproc_per_node N -m ifp_compile.train --config CONFIG    data-parallel

See ``config.py`` for the keys, ``data.py`` for the two stages' examples,
``trainer.py`` for the loop and ``checkpoint.py`` for the on-disk format.
"""

from .config import PredictorConfig, TrainConfig, TrainError, config_from_dict, load_config
from .data import ByteTokenizer, Example, load_examples, read_jsonl
from .trainer import MaskedLMLoss, Result, Setup, evaluate, example_loss, load_trained, run, setup

__all__ = [
    "ByteTokenizer",
    "Example",
    "MaskedLMLoss",
    "PredictorConfig",
    "Result",
    "Setup",
    "TrainConfig",
    "TrainError",
    "config_from_dict",
    "evaluate",
    "example_loss",
    "load_config",
    "load_examples",
    "load_trained",
    "read_jsonl",
    "run",
    "setup",
]
