"""Graph passes, one per module: discover_ffn -> insert_masks -> specialize.

``program_edit`` holds the few helpers that edit an ExportedProgram directly; every
pass that does not re-export goes through it.
"""

from .discover_ffn import find_ffn_blocks
from .insert_masks import insert_masks
from .specialize import predict_masks, specialize

__all__ = ["find_ffn_blocks", "insert_masks", "predict_masks", "specialize"]
