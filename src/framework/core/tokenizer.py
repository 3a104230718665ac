"""Tokenizers built offline: the real CLIP BPE tokenizer, and small stand-ins for the tiny models' T5, LLM and BERT
encoders.

Tiny test models and the embedded testbed need a CLIP tokenizer, and none can be downloaded here. The open-clip-torch
wheel ships OpenAI's BPE merge list (`bpe_simple_vocab_16e6.txt.gz`); the 49,408-token CLIP vocabulary is a fixed
function of it (byte symbols, their end-of-word forms, one token per merge, then the two special tokens), so the
tokenizer built here gives exactly the token ids of `openai/clip-vit-*` tokenizers.
"""

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import BertTokenizer, CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer
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


def build_byte_tokenizer(
    specials: list[str], chat_template: str, pad_token: str, eos_token: str, words: str = ""
) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer for the tiny LLM-conditioned flow models (Qwen2.5-VL, Qwen3 and Mistral-3 encoders
    all read byte-level BPE): one token per byte, plus one per word of `words` (the fixed text their pipelines wrap a
    prompt in: a system turn, an instruction), plus the special tokens of their chat templates. Knowing those words
    whole, as the real vocabularies do, keeps the template's token count real: Qwen-Image's pipeline drops the first
    34 tokens by index, and a prompt must not fall beyond `max_sequence_length` behind a long system message."""
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for special in specials:  # a special token ends a word as a line break does ("<|im_start|>user": "user")
        words = words.replace(special, "\n")
    roles = dict(unk_token=None, bos_token=None, eos_token=eos_token, pad_token=pad_token)
    split = Qwen2Tokenizer(vocab=dict(vocab), merges=[], **roles).backend_tokenizer.pre_tokenizer.pre_tokenize_str
    merges: list[tuple[str, str]] = []
    for piece in dict.fromkeys(piece for piece, _ in split(words)):  # each word merged left to right
        for i in range(1, len(piece)):
            if (piece[:i], piece[i]) not in merges:
                merges.append((piece[:i], piece[i]))
                vocab.setdefault(piece[: i + 1], len(vocab))
    vocab |= {token: len(vocab) + i for i, token in enumerate(specials)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, **roles)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in (pad_token, eos_token)]}
    )
    tokenizer.chat_template = chat_template
    return tokenizer


# Qwen's chat format (Qwen3's template reduced to plain text turns, with its empty thinking block when thinking is off)
QWEN_CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral-3's chat format for typed content parts (system prompt, then the user's instruction)
MISTRAL_CHAT = (
    "<s>{% for m in messages %}{% set text = m['content'] | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ text }}[/INST]{% endif %}"
    "{% endfor %}"
)


def build_qwen_tokenizer(words: str = "") -> Qwen2Tokenizer:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return build_byte_tokenizer(specials, QWEN_CHAT, "<|endoftext|>", "<|im_end|>", words)


def build_mistral_tokenizer(words: str = "") -> Qwen2Tokenizer:
    specials = ["<pad>", "<s>", "</s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"]
    return build_byte_tokenizer(specials, MISTRAL_CHAT, "<pad>", "</s>", words)


def build_bert_tokenizer(words: str = "") -> BertTokenizer:
    """A lower-casing WordPiece tokenizer (BERT's, which ImageReward's BLIP reads) whose vocabulary is BERT's five
    special tokens at BERT's roles, letters and digits (alone and as word pieces), and the words of `words`."""
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = dict.fromkeys([*specials, *symbols, *(f"##{c}" for c in symbols), *words.lower().split()])
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
