"""The byte-level CLIP vocabulary shipped in ``assets/tiny_tokenizer`` for the offline test models.

It holds every byte-level character (GPT-2's ``bytes_to_unicode`` table), each alone and with
CLIP's end-of-word marker ``</w>``, plus the two special tokens, and no merges. So any text
tokenizes (one token per byte), and different prompts give different ids.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def byte_level_vocab() -> dict[str, int]:
    """Every byte character, then each with ``</w>``, then BOS and EOS: 514 tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


def write_tiny_tokenizer(folder: Path = TINY_TOKENIZER_DIR) -> None:
    """(Re)write ``vocab.json`` and ``merges.txt``; run ``python -m engine.tokenizer_vocab``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False, indent=0) + "\n", "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")


if __name__ == "__main__":
    write_tiny_tokenizer()
    print(f"wrote {TINY_TOKENIZER_DIR}")
