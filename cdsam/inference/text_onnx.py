"""The text half of an ONNX export: token ids → text features as a graph of its own
(``text.onnx``), and the tower's tokenizer as a ``tokenizer.json`` the Hugging Face
``tokenizers`` library reads (Rust, no torch), so a deployed model takes any prompt.

How an id row is made, in words a non-cdsam caller can follow (the sidecar's ``text`` entry
and ``examples/onnx_predict.py``): the text cleaned as open_clip cleans it (``clean``:
``ftfy.fix_text``, ``html.unescape`` twice, strip; then ``lower``: whitespace runs → one
space, lower case; ``whitespace``: the same without lower case; ``canonicalize``: ``_`` →
space, punctuation removed, whitespace runs → one space, lower case), then
``tokenizer.encode(text).ids`` (its post-processor adds the start and end tokens; a Hugging
Face tokenizer also truncates, keeping its end token), cut to ``context_length`` with the last
id set to ``end_id`` when it was cut, padded with ``pad_id``. For open_clip's CLIP BPE (OpenAI CLIP, the tiny default) the
file is built here from open_clip's own vocabulary and merges; a Hugging Face tokenizer (SigLIP
2's Gemma) is saved as it is. The export compares both ways of tokenizing on the vocabulary
and probes open_clip's cleaning changes (curly quotes, HTML entities, full-width letters,
ligatures, long prompts), and refuses to write a tokenizer that disagrees on any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cdsam.errors import UserError
from cdsam.models.clip_text import ClipTextEncoder

TEXT_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
# open_clip's pre-split of a cleaned prompt (its SimpleTokenizer's pattern, special tokens
# first): contractions, letter runs, single digits, other non-space runs.
CLIP_SPLIT = (r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
              r"[^\s\p{L}\p{N}]+")


class TextGraph(nn.Module):
    """BxL int64 token ids → BxD L2-normalised text features."""

    def __init__(self, tower: ClipTextEncoder) -> None:
        super().__init__()
        self.clip = tower.clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=True).float()


def _clip_bpe(tok) -> Any:
    """open_clip's SimpleTokenizer as a `tokenizers` BPE: byte-level pieces of the pre-split
    words, ``</w>`` on each word's last symbol, start/end tokens around."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    bpe = models.BPE(vocab=dict(tok.encoder), merges=list(merges), end_of_word_suffix="</w>",
                     fuse_unk=False)
    out = Tokenizer(bpe)
    out.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
        normalizers.Lowercase()])
    out.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    out.decoder = decoders.ByteLevel()
    sot, eot = tok.sot_token_id, tok.eot_token_id
    out.post_processor = TemplateProcessing(
        single="<start_of_text> $A <end_of_text>",
        special_tokens=[("<start_of_text>", sot), ("<end_of_text>", eot)])
    return out, {"pad_id": 0, "end_id": eot}


def clean_name(tok) -> str:
    """Which of open_clip's cleanings the tower's tokenizer applies before tokenizing."""
    from open_clip.tokenizer import get_clean_fn

    fn = getattr(tok, "clean_fn", None)
    for name in ("lower", "whitespace", "canonicalize"):
        if fn is get_clean_fn(name):
            return name
    raise UserError(f"--mode onnx: the text tower's tokenizer ({type(tok).__name__}) cleans "
                    f"text in a way the export cannot name; export with --fixed-prompts")


def export_tokenizer(tower: ClipTextEncoder, out: Path) -> dict[str, Any]:
    """Write ``out/tokenizer.json``; returns how to make an id row from it."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    from tokenizers import Tokenizer

    tok = tower.tokenizer
    length = int(getattr(tok, "context_length", None) or tower.clip.context_length)
    if isinstance(tok, SimpleTokenizer):
        fast, ids = _clip_bpe(tok)
    elif isinstance(tok, HFTokenizer) and hasattr(tok.tokenizer, "backend_tokenizer"):
        # A copy that truncates as transformers does for open_clip (truncation=True keeps the
        # post-processor's special tokens), so a long prompt keeps its end token.
        fast = Tokenizer.from_str(tok.tokenizer.backend_tokenizer.to_str())
        fast.no_padding()
        fast.enable_truncation(max_length=length)
        pad = tok.tokenizer.pad_token_id
        ids = {"pad_id": int(pad if pad is not None else 0), "end_id": None}
    else:
        raise UserError(f"--mode onnx: the text tower's tokenizer ({type(tok).__name__}) has no "
                        f"tokenizers-library form here; export with --fixed-prompts")
    fast.save(str(out / TOKENIZER_FILE))
    return {"tokenizer": TOKENIZER_FILE, "context_length": length, "clean": clean_name(tok),
            **ids}


def token_ids(tokenizer, spec: dict[str, Any], texts: list[str]) -> np.ndarray:
    """The id rows of ``texts``, made as the sidecar says (see the module doc)."""
    from open_clip.tokenizer import get_clean_fn

    clean = get_clean_fn(spec["clean"])
    length, rows = spec["context_length"], []
    for text in texts:
        ids = list(tokenizer.encode(clean(text)).ids)
        if len(ids) > length:
            ids = ids[:length]
            if spec.get("end_id") is not None:
                ids[-1] = spec["end_id"]
        rows.append(ids + [spec["pad_id"]] * (length - len(ids)))
    return np.asarray(rows, dtype=np.int64)


def tokenizer_agrees(tower: ClipTextEncoder, out: Path, spec: dict[str, Any],
                     texts: list[str]) -> dict[str, Any]:
    """The exported tokenizer's ids vs the tower's own on ``texts``; a disagreement is a
    UserError naming the texts (a deployed model would embed other ids than it trained on)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / TOKENIZER_FILE))
    ours = token_ids(tok, spec, texts)
    theirs = tower.tokenizer(list(texts)).numpy()
    same = [bool(np.array_equal(a, b)) for a, b in zip(ours, theirs, strict=True)]
    differ = [t for t, s in zip(texts, same, strict=True) if not s]
    if differ:
        raise UserError(f"--mode onnx: the exported tokenizer.json gives other ids than the "
                        f"text tower's tokenizer for {len(differ)} of {len(texts)} probe texts "
                        f"(e.g. {differ[:3]}); export with --fixed-prompts")
    return {"texts": len(texts), "identical": sum(same)}
