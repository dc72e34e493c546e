"""Character-level tokenizer shared by every task, model and search component.

The vocabulary is fixed and small: four special tokens followed by the
characters the tasks write. The step separator ``SEP`` stands for the newline
that ends every reasoning step, so ``decode(encode(text)) == text`` for any
text made of ``CHARS`` and newlines.

Token ids are stable across versions of the project: checkpoints depend on
them. Append new characters at the end, never reorder.
"""

from __future__ import annotations

import numpy as np

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "\n")
# Characters the tasks write. Prompts look like "4,9,10,13>24\n"; steps like
# "13-9=4"; search traces add "#" (backtrack marker), "|" and letters.
CHARS = "0123456789+-*/=,>:?# |()abcdefghijklmnopqrstuvwxyz."

VOCAB = SPECIALS[:3] + ("\n",) + tuple(CHARS)
VOCAB_SIZE = len(VOCAB)
_CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB) if i >= SEP}


class TokenizerError(ValueError):
    """Raised for text the vocabulary cannot represent."""


def encode(text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Text -> token ids. Newlines become ``SEP``."""
    ids = [BOS] if bos else []
    for pos, ch in enumerate(text):
        tid = _CHAR_TO_ID.get(ch)
        if tid is None:
            raise TokenizerError(
                f"character {ch!r} at position {pos} of {text!r} is not in the "
                f"vocabulary {CHARS!r} (plus newline)")
        ids.append(tid)
    if eos:
        ids.append(EOS)
    return ids


def decode(ids, *, stop_at_eos: bool = True) -> str:
    """Token ids -> text. PAD and BOS are dropped; stops at EOS by default."""
    out = []
    for tid in np.asarray(ids).reshape(-1).tolist():
        if tid == EOS and stop_at_eos:
            break
        if tid in (PAD, BOS, EOS):
            continue
        if not 0 <= tid < VOCAB_SIZE:
            raise TokenizerError(f"token id {tid} is outside the vocabulary (size {VOCAB_SIZE})")
        out.append(VOCAB[tid])
    return "".join(out)


def encode_padded(text: str, length: int, *, bos: bool = False, eos: bool = False) -> np.ndarray:
    """Encode and right-pad with PAD to ``length``; raises if it does not fit. -> int32[length]"""
    ids = encode(text, bos=bos, eos=eos)
    if len(ids) > length:
        raise TokenizerError(f"{text!r} needs {len(ids)} tokens, more than the {length} allowed")
    out = np.full((length,), PAD, np.int32)
    out[: len(ids)] = ids
    return out


def char_id(ch: str) -> int:
    """Token id of a single vocabulary character (newline -> SEP)."""
    return _CHAR_TO_ID[ch]


# Ids used by the JAX step transitions (parsing digits and operators).
DIGIT0 = _CHAR_TO_ID["0"]  # digits are contiguous: DIGIT0 + d
PLUS, MINUS, TIMES, DIVIDE = (_CHAR_TO_ID[c] for c in "+-*/")
EQUALS = _CHAR_TO_ID["="]
QUESTION = _CHAR_TO_ID["?"]
