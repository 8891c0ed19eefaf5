"""The prompts of a text-conditional run: the `prompts` table, one row per distinct prompt, with how the
model's tokenizer counts it (and whether max_prompt_tokens cuts it)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.context import RunContext


@dataclass(frozen=True)
class PromptsReport:
    """What `prompts` published."""

    prompts: int  # in the file (a repeated prompt counts each time: it is one condition each time)
    distinct: int  # rows in the table
    truncated: int  # cut by max_prompt_tokens
    max_tokens: int
    sha256: str  # of the prompt file: the asset's data version


def publish_prompts(ctx: RunContext) -> PromptsReport:
    """Tokenize every prompt (the tokenizer alone is loaded) and replace its `prompts` row, in one
    transaction."""
    prompts = ctx.prompts
    if prompts is None:
        raise ValueError("sampling.prompts is not set: a text-conditional model needs a prompt file")
    cfg = ctx.config.model
    counts = ctx.family.count_tokens(cfg, prompts.texts)
    rows = {}
    for p, c in zip(prompts.prompts, counts, strict=True):
        rows.setdefault(p.prompt_id, {"text": p.text, "tags": list(p.tags), "words": p.words(), "tokens": c.tokens,
                                      "max_tokens": cfg.max_prompt_tokens, "truncated": c.truncated})
    with ctx.warehouse.transaction() as tx:
        for prompt_id, row in rows.items():
            tx.replace_partition("prompts", {"prompt_id": prompt_id}, [row])
    truncated = sum(r["truncated"] for r in rows.values())
    if truncated:
        ctx.log(f"{truncated} of {len(rows)} prompts are longer than model.max_prompt_tokens="
                f"{cfg.max_prompt_tokens} tokens: the text encoder sees their first {cfg.max_prompt_tokens} "
                "(see `SELECT * FROM prompts WHERE truncated`)")
    return PromptsReport(prompts=len(prompts), distinct=len(rows), truncated=truncated,
                         max_tokens=cfg.max_prompt_tokens, sha256=prompts.sha256)
