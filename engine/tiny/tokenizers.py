"""The tiny checkpoints' tokenizers, trained once per process on a built-in corpus of prompt-like English: CLIP
byte-level BPE and T5 sentencepiece, written in the real files' formats."""

from __future__ import annotations

import functools
import io
import json
import tempfile
from collections import Counter
from pathlib import Path

import sentencepiece
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .recipes import TokenizerPart


_SUBJECTS = ("a cat", "an astronaut", "a red fox", "the old lighthouse", "two children", "a bowl of fruit",
             "a dragon", "my grandmother", "a vintage car", "the city skyline", "a robot", "an owl", "a sailing ship",
             "a mountain village", "three horses", "a bicycle", "the forest", "a cup of coffee", "a knight", "Paris")
_MODIFIERS = ("sitting on a chair", "riding a horse", "in the rain", "at sunset", "under the stars",
              "on the moon", "by the sea", "in a garden", "made of glass", "covered in snow", "with flowers",
              "in front of a castle", "during a storm", "on a wooden table", "near the river")
_STYLES = ("photograph, 35mm, film grain", "oil painting by a famous artist", "digital art, highly detailed",
           "watercolor illustration", "studio lighting, 8k, sharp focus", "anime style, vibrant colors",
           "pencil sketch, black and white", "cinematic, dramatic light", "isometric 3D render",
           "portrait, soft bokeh, 85mm lens", "trending on artstation", "low poly, pastel colours")
# Every character class once, so neither tokenizer needs an unknown token for plain ASCII prompts.
_ALPHABET = ("The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG! "
             "0123456789 (x2) [high quality], {wide}: 'yes'; \"no\" - a/b @ #1 $5 % & * + = ? ~ ` ^ | \\ < >")


def _corpus() -> list[str]:
    """Deterministic prompt-like sentences: every subject with several modifiers and styles, plus the alphabet."""
    lines = [_ALPHABET]
    for i, subject in enumerate(_SUBJECTS):
        for j in range(6):
            modifier = _MODIFIERS[(i + 4 * j) % len(_MODIFIERS)]
            style = _STYLES[(3 * i + j) % len(_STYLES)]
            lines.append(f"{subject} {modifier}, {style}")
            lines.append(f"{subject.capitalize()} {modifier}.")
    return lines


_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _clip_words() -> Counter[tuple[str, ...]]:
    """The corpus split into byte-level words exactly as transformers' CLIPTokenizer splits text (its own
    normaliser and pre-tokenizer), each word a tuple of byte symbols, the last one with CLIP's end-of-word </w>."""
    backend = CLIPTokenizer().backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    return words


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


@functools.cache
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """Learn byte-level BPE merges and lay the vocabulary out as OpenAI CLIP does.

    A plain BPE learner, because the `tokenizers` trainer breaks ties between equally frequent pairs differently
    in every process and so would change the checkpoint bytes; here ties go to the smallest pair. CLIP's vocab is
    the 256 byte symbols, the same with the end-of-word suffix </w>, one token per merge, then <|startoftext|> and
    <|endoftext|> last (so the end token has the highest id, as CLIP's pooling assumes).
    """
    words = _clip_words()
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        best = min(pairs, key=lambda pair: (-pairs[pair], pair), default=None)
        if best is None or pairs[best] < 2:
            break
        merges.append(best)
        words = Counter({_merge_pair(word, best): count for word, count in words.items()})
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + list(_CLIP_SPECIALS)
    return {token: i for i, token in enumerate(tokens)}, tuple(f"{a} {b}" for a, b in merges)


@functools.cache
def _t5_spiece_model() -> bytes:
    """Train a sentencepiece unigram model with T5's special ids: pad 0, eos 1, unk 2, no bos."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        # vocab_size is an upper bound (hard_vocab_limit=False): the small corpus yields what it can.
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="unigram", vocab_size=400,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _tokenizer_files(part: TokenizerPart) -> dict[str, bytes]:
    """The files of a tokenizer folder, named as in the real checkpoints."""
    if part.kind == "clip":
        vocab, merges = _clip_vocab_and_merges()
        special = {"bos_token": _CLIP_SPECIALS[0], "eos_token": _CLIP_SPECIALS[1], "unk_token": _CLIP_SPECIALS[1],
                   "pad_token": part.pad_token}
        files = {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n"}
        config = dict(special, tokenizer_class="CLIPTokenizer", do_lower_case=True, errors="replace")
    else:
        special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": part.pad_token}
        files = {"spiece.model": _t5_spiece_model()}
        config = dict(special, tokenizer_class="T5Tokenizer", extra_ids=100)
    config["model_max_length"] = part.model_max_length
    files["tokenizer_config.json"] = json.dumps(config, indent=2, sort_keys=True)
    files["special_tokens_map.json"] = json.dumps(special, indent=2, sort_keys=True)
    return {name: content.encode() if isinstance(content, str) else content for name, content in files.items()}


def write_tokenizer(part: TokenizerPart, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in _tokenizer_files(part).items():
        (folder / name).write_bytes(content)


@functools.cache
def tokenizer_of(part: TokenizerPart) -> PreTrainedTokenizerBase:
    """The tokenizer object, loaded from its files exactly as a pipeline load would (transformers 5 ignores
    vocab/merges paths given to the constructor, so `from_pretrained` on a folder is the only faithful check)."""
    cls = CLIPTokenizer if part.kind == "clip" else T5Tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(part, Path(tmp))
        return cls.from_pretrained(tmp)
