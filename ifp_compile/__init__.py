"""ifp-compile: instruction-following pruning as a compiler over torch.export graphs.

    import ifp_compile as ifp
    ep = ifp.export(model, (input_ids,))
    blocks = ifp.find_ffn_blocks(ep)
    masked = ifp.insert_masks(ep)                      # input ffn_masks: one 1-D mask per block
    small = ifp.specialize(masked, mask=masks)         # smaller dense ExportedProgram
    prog = ifp.insert_masks(ep, predictor=pred)        # input instruction_ids instead
    small = ifp.specialize(prog, "Solve this math word problem.", tokenizer=tok)
"""

__version__ = "0.3.0"  # before the imports: modules that write manifests read it

from .blocks import AttentionBlock, FFNBlock, HeadSlice, ParamSlice
from .capture import CausalLMLogits, export, export_checkpoint
from .eager import to_module
from .errors import IFPError, InstructionError, MaskError, NoFFNFoundError, ProgramError
from .export_task import export_task
from .save_load import load, save
from .weights import Checkpoint, CheckpointError, is_weightless, materialize
from .passes import attention_report, find_attention_blocks, find_ffn_blocks, insert_masks, predict_masks, specialize
from .stats import count_parameters, kept_parameters


__all__ = [
    "AttentionBlock",
    "HeadSlice",
    "attention_report",
    "find_attention_blocks",
    "CausalLMLogits",
    "FFNBlock",
    "IFPError",
    "InstructionError",
    "MaskError",
    "NoFFNFoundError",
    "ParamSlice",
    "ProgramError",
    "count_parameters",
    "export",
    "export_checkpoint",
    "export_task",
    "Checkpoint",
    "CheckpointError",
    "is_weightless",
    "load",
    "materialize",
    "save",
    "find_ffn_blocks",
    "insert_masks",
    "kept_parameters",
    "predict_masks",
    "specialize",
    "to_module",
    "__version__",
]
