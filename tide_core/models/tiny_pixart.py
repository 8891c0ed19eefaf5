"""``model.source = "tiny-pixart"``: a tiny random-weight PixArt, built here, loaded like any PixArt.

Real PixArt checkpoints cannot be downloaded on the project's machines, so the text-conditional path runs
end to end on this: a ``PixArtTransformer2DModel``, a ``transformers`` T5 encoder, a T5 fast tokenizer (a
Unigram model over a small fixed vocabulary), a two-block VAE and a DDPM schedule, each built from a config
with seeded random weights and written with ``save_pretrained`` into ``model.tiny_pixart.checkpoint_dir``.
From there it loads through exactly the code a hub id or a downloaded directory goes through (``PixArt``).
The weights are random, so its images are noise: it tests the machinery, not the science.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch

from tide_core.config import ModelConfig, TinyPixArtConfig
from tide_core.files import atomic_directory
from tide_core.models.base import Log, ModelInfo, ModelStatus
from tide_core.models.dit import TIDE_MODEL_FILE, directory_fingerprint, read_meta
from tide_core.models.pixart import SITES, PixArt
from tide_core.models.registry import ModelError
from tide_core.prompts import PromptSet

TINY_VAE_FACTOR = 2  # two VAE blocks: one halving
# The tokenizer's words: what prompts of digits, colours, styles and a few objects are made of; any other
# word maps to <unk>, which is still a valid prompt.
VOCABULARY = tuple("""a an the of on in with and photo picture drawing image sketch painting style digit
number zero one two three four five six seven eight nine red green blue yellow orange purple pink brown black
white grey gray bold thin regular thick small large big background cat dog house tree car bird flower sky city
night day watercolor""".split())


def fingerprint(cfg: TinyPixArtConfig) -> str:
    """What the built weights depend on (not where they are written)."""
    payload = {**cfg.model_dump(exclude={"checkpoint_dir"}), "vocabulary": VOCABULARY}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class TinyPixArt(PixArt):
    """The tiny PixArt: built by ``prepare``; every other method is PixArt's, on the built directory."""

    family: ClassVar[str] = "tiny-pixart"

    @classmethod
    def _built(cls, cfg: ModelConfig) -> ModelConfig:
        """The config as PixArt sees it: model.source = the built directory."""
        return cfg.model_copy(update={"source": cfg.tiny_pixart.checkpoint_dir})

    @classmethod
    def describe(cls, cfg: ModelConfig) -> ModelInfo:
        t = cfg.tiny_pixart
        multiple = TINY_VAE_FACTOR * 2
        for name in ("height", "width"):
            value = getattr(cfg, name)
            if value is not None and value % multiple:
                raise ModelError(f"model.{name}={value} is not a multiple of {multiple} (the tiny VAE's factor "
                                 f"times the patch size); the native size is {t.sample_size * TINY_VAE_FACTOR}")
        return ModelInfo(family=cls.family, source=t.checkpoint_dir, num_layers=t.num_layers,
                         hidden_size=t.num_heads * t.head_dim, sites=SITES)

    @classmethod
    def fingerprint_of(cls, cfg: ModelConfig) -> str:
        return directory_fingerprint(cfg.tiny_pixart.checkpoint_dir)

    @classmethod
    def prepare(cls, cfg: ModelConfig, log: Log, force: bool = False) -> ModelStatus:
        """Build the directory unless it records this config's fingerprint (seconds; deterministic)."""
        t = cfg.tiny_pixart
        out = Path(t.checkpoint_dir)
        if force or read_meta(out).get("tiny_pixart_fingerprint") != fingerprint(t):
            log(f"building the tiny random PixArt in {out} (seed {t.seed})")
            build(t, out)
        return ModelStatus(str(out), trained_now=False, fingerprint=cls.fingerprint_of(cfg), meta=read_meta(out))

    @classmethod
    def count_tokens(cls, cfg: ModelConfig, texts: list[str]):
        return super().count_tokens(cls._built(cfg), texts)

    @classmethod
    def load(cls, cfg: ModelConfig, prompts: PromptSet | None = None, negative_prompt: str = "") -> TinyPixArt:
        if read_meta(cfg.tiny_pixart.checkpoint_dir).get("tiny_pixart_fingerprint") != fingerprint(cfg.tiny_pixart):
            raise ModelError(f"no tiny PixArt built with this [model.tiny_pixart] config at "
                             f"{cfg.tiny_pixart.checkpoint_dir}: materialize `dit_model` first")
        return super().load(cls._built(cfg), prompts, negative_prompt)


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


def build(cfg: TinyPixArtConfig, out: Path) -> Path:
    """Every component from a config, seeded, saved in the diffusers pipeline layout (atomically)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PixArtTransformer2DModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "writing shards" bar per build in every asset's log
    with atomic_directory(out) as tmp:
        save_t5_tokenizer(tmp / "tokenizer")
        torch.manual_seed(cfg.seed)
        tiny_t5(cfg.text_width, cfg.text_layers).save_pretrained(tmp / "text_encoder")
        torch.manual_seed(cfg.seed + 1)
        PixArtTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=4,
                                 out_channels=8, num_layers=cfg.num_layers, cross_attention_dim=cfg.num_heads *
                                 cfg.head_dim, sample_size=cfg.sample_size, patch_size=2,
                                 caption_channels=cfg.text_width, norm_num_groups=4).save_pretrained(tmp / "transformer")
        torch.manual_seed(cfg.seed + 2)
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      layers_per_block=1, norm_num_groups=4).save_pretrained(tmp / "vae")
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02
                      ).save_pretrained(tmp / "scheduler")
        index = {"_class_name": "PixArtAlphaPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                 "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
                 "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        weights = hashlib.sha256()  # the identity the DiT family's fingerprint reads (not a file time)
        for f in sorted((tmp / "transformer").glob("*.safetensors")):
            weights.update(f.read_bytes())
        meta = {"tiny_pixart_fingerprint": fingerprint(cfg), "weights_sha256": weights.hexdigest(),
                "tiny_pixart_config": cfg.model_dump(exclude={"checkpoint_dir"})}
        (tmp / TIDE_MODEL_FILE).write_text(json.dumps(meta, indent=2))
    return out
