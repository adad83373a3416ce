"""Training Sparse Transformers, as a library: train.py is its command line, bench/ times its pieces.

``train(given)`` runs a whole training run from train.py's flags. Its pieces, one job per module:
settings (defaults, --resume's run.json, the model config), distributed (processes, DDP/FSDP),
optim (AdamW, warmup + cosine schedule), precision (bf16/fp16/fp32 autocast), ema (weight averaging),
state (state.pt: save and resume, atomic), log (log.jsonl), evaluation (held-out bits/dim),
export (the shipped checkpoint and its card), memory (the C allocator on the CPU), loop (the steps).
"""

from .distributed import Dist, setup_distributed
from .ema import EMA
from .errors import TrainingError
from .evaluation import held_out_bits
from .export import data_card, earlier_runs, export_checkpoint, run_record
from .log import Log
from .loop import train
from .memory import keep_freed_memory
from .optim import lr_factor, make_optimizer
from .precision import PRECISIONS, autocast, choose_precision
from .settings import CONTROL, MODEL_FLAGS, RUN_SETTINGS, model_config, resolve_settings
from .state import Parts, Progress, atomic_torch_save, resume_state, save_state

__all__ = ["CONTROL", "EMA", "MODEL_FLAGS", "PRECISIONS", "RUN_SETTINGS", "Dist", "Log", "Parts", "Progress",
           "TrainingError", "atomic_torch_save", "autocast", "choose_precision", "data_card", "earlier_runs",
           "export_checkpoint", "held_out_bits", "keep_freed_memory", "lr_factor", "make_optimizer", "model_config",
           "resolve_settings", "resume_state", "run_record", "save_state", "setup_distributed", "train"]
