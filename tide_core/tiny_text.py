"""The small word-level text stack of the models built or trained here (tiny PixArt, SD3 and FLUX, the
styled-digits PixArt): one vocabulary, a T5 fast tokenizer over it and a T5 encoder of any small size."""

from __future__ import annotations

from pathlib import Path

# The tokenizers' words: what prompts of digits, colours, styles and a few objects are made of; any other
# word maps to <unk> (T5) or is spelled letter by letter (CLIP), which is still a valid prompt.
VOCABULARY = tuple("""a an the of on in with and photo picture drawing image sketch painting style digit
number zero one two three four five six seven eight nine red green blue yellow orange purple pink brown black
white grey gray bold thin regular thick small large big background cat dog house tree car bird flower sky city
night day watercolor""".split())

T5_PIECES = 3 + len(VOCABULARY)  # <pad>, </s>, <unk>, then a piece per word


def save_t5_tokenizer(path: Path) -> None:
    """A T5 fast tokenizer over VOCABULARY: Unigram pieces with the sentencepiece word-start marker, the T5
    tokenizer's own model type (a WordLevel tokenizer saves, but transformers cannot load it again)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(VOCABULARY)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=512).save_pretrained(path)


def tiny_t5(width: int, layers: int):
    """A random T5 encoder over save_t5_tokenizer's pieces (seed torch before calling)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=T5_PIECES, d_model=width, d_kv=8, d_ff=2 * width, num_layers=layers,
                                   num_heads=4, relative_attention_num_buckets=8))
