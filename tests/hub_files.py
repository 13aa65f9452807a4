"""Files in the formats the model hubs ship, with made-up contents (hubs are unreachable here)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

PROMPT_WORDS = ("a", "an", "the", "red", "green", "blue", "yellow", "circle", "square",
                "triangle", "star", "photo", "of")


def write_hub_tokenizer(folder: Path, vocab_size: int) -> None:
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) as
    ``AutoTokenizer.from_pretrained`` reads it: SigLIP 2's special tokens (<pad> 0, <eos> 1,
    <bos> 2, <unk> 3), the prompt words, then filler entries up to ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {w: i for i, w in enumerate([*special, *PROMPT_WORDS])}
    vocab.update({f"tok{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>",
                                                       special_tokens=[("<eos>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            bos_token="<bos>", unk_token="<unk>").save_pretrained(folder)


def write_open_clip_repo(folder: Path, name: str, seed: int = 0) -> Path:
    """An open_clip hub repo as ``hf download`` leaves it: open_clip_config.json,
    open_clip_model.safetensors (the whole model, random values) and the tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(name)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}, indent=2))
    write_hub_tokenizer(folder, model_cfg["text_cfg"]["vocab_size"])
    return folder


def write_sam2_checkpoint(path: Path, config: str = "sam2.1_hiera_b+",
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """A SAM 2 checkpoint as Meta ships it: ``{"model": state_dict}`` of the whole SAM2Base
    (Hiera encoder and memory modules included), random values; returns that state dict.
    Needs Meta's sam2 package (installed apart: README)."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    version = "sam2.1" if config.startswith("sam2.1") else "sam2"
    sam = build_sam2(f"configs/{version}/{config}.yaml", ckpt_path=None, device="cpu")
    torch.save({"model": sam.state_dict()}, path)
    return sam.state_dict()
