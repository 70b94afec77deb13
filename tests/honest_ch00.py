"""Chapter 00 notebooks for the grading tests: honest answers written differently from the answer key.

`notebook(overrides)` is the shipped chapter-00 notebook with every exercise cell replaced by
an honest implementation (or by the source given in ``overrides``); `code_cell` and
`insert_cells` build the other shapes the tests need.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXERCISES = [
    "per_token_loss",
    "answer_logit_diff",
    "previous_token_score",
    "ablate_head",
    "head_ablation_loss",
    "head_ablation_effects",
]

HONEST = {
    "per_token_loss": """def per_token_loss(logits, tokens):
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -torch.gather(logp, -1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)""",
    "answer_logit_diff": """def answer_logit_diff(logits, answer_ids, wrong_ids):
    last = logits[:, -1, :]
    rows = torch.arange(last.shape[0])
    if answer_ids.shape != rows.shape or wrong_ids.shape != rows.shape:
        raise ValueError("one answer id and one wrong id per prompt")
    return last[rows, answer_ids] - last[rows, wrong_ids]""",
    "previous_token_score": """def previous_token_score(pattern):
    if pattern.shape[-1] < 2:
        raise ValueError("no previous token")
    q = torch.arange(1, pattern.shape[-1])
    return pattern[:, q, q - 1].mean(-1)""",
    "ablate_head": """def ablate_head(z, head):
    if head not in range(z.shape[2]):
        raise IndexError(head)
    return z.index_fill(2, torch.tensor([head]), 0.0)""",
    "head_ablation_loss": """def head_ablation_loss(model, tokens, layer, head, loss_mask=None):
    def zero(z, hook):
        return ablate_head(z, head)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
    loss = per_token_loss(logits, tokens)
    return float(loss.mean() if loss_mask is None else loss[loss_mask[:, 1:]].mean())""",
    "head_ablation_effects": """def head_ablation_effects(model, tokens, loss_mask=None, replacements=None):
    keep = (torch.ones_like(tokens, dtype=torch.bool) if loss_mask is None else loss_mask)[:, 1:].float()
    if (keep.sum(1) == 0).any():
        raise ValueError("a prompt counts nothing")
    def prompt_loss(logits):
        return (per_token_loss(logits, tokens) * keep).sum(1) / keep.sum(1)
    clean = prompt_loss(model(tokens))
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, len(tokens))
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            def swap(z, hook, layer=layer, head=head):
                z = z.clone()
                z[:, :, head] = 0.0 if replacements is None else replacements[layer][:, :, head]
                return z
            logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", swap)])
            out[layer, head] = prompt_loss(logits) - clean
    return out""",
}


def shipped() -> dict:
    return json.loads((REPO / "chapters" / "00_orientation.ipynb").read_text())


def source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def code_cell(src: str, cid: str) -> dict:
    return {"cell_type": "code", "id": cid, "metadata": {}, "execution_count": None, "outputs": [], "source": src}


def exercise_cell_index(nb: dict, name: str) -> int:
    return next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and f"def {name}(" in source(c))


def notebook(overrides: dict[str, str] | None = None, keep_check: bool = True) -> dict:
    """The chapter-00 notebook answered honestly; ``overrides`` replaces whole exercise cells by name."""
    nb = shipped()
    for name in EXERCISES:
        i = exercise_cell_index(nb, name)
        body = (overrides or {}).get(name, HONEST[name])
        nb["cells"][i]["source"] = body + (f"\n\n\n{name} = check({name})" if keep_check else "")
    return nb


def write(nb: dict, path: Path) -> Path:
    path.write_text(json.dumps(nb, indent=1))
    return path
