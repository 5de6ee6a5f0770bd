"""Graph passes, one per module: discover_ffn -> insert_masks -> specialize.

``program_edit`` holds the few helpers that edit an ExportedProgram directly; every
pass that does not re-export goes through it.
"""

from .discover_attention import attention_report, find_attention_blocks
from .discover_ffn import find_ffn_blocks
from .insert_masks import insert_masks
from .specialize import predict_masks, specialize

__all__ = ["attention_report", "find_attention_blocks", "find_ffn_blocks", "insert_masks", "predict_masks", "specialize"]
