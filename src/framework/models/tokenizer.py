"""The real CLIP BPE tokenizer, built offline.

Tiny test models and the embedded testbed need a CLIP tokenizer, and none can be downloaded here. The open-clip-torch
wheel ships OpenAI's BPE merge list (`bpe_simple_vocab_16e6.txt.gz`); the 49,408-token CLIP vocabulary is a fixed
function of it (byte symbols, their end-of-word forms, one token per merge, then the two special tokens), so the
tokenizer built here gives exactly the token ids of `openai/clip-vit-*` tokenizers.
"""

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def _open_clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locate without importing open_clip (slow, pulls torchvision)
    if spec is None or spec.origin is None:
        raise ImportError("open-clip-torch is required: it ships the CLIP BPE merge list")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(_open_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length, pad_token=pad_token)


T5_PIECES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.;:'-!?()"


def build_t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """A T5 (SentencePiece unigram) tokenizer with a tiny vocabulary, for the tiny flow models' T5 encoders: T5's
    special ids (pad 0, eos 1, unk 2) and one piece per character, word-initial or not. No T5 vocabulary ships
    offline, and the tiny encoders are random, so only the class and its conventions need to be real."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{c}", -3.0) for c in T5_PIECES] + [(c, -4.0) for c in T5_PIECES]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
