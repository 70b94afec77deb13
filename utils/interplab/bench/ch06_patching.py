"""Benchmark: the library's batched patching sweeps (`interplab.patching`) against TransformerLens's `patching` module.

    python -m interplab.bench.ch06_patching            # the bundled model, 16 IOI prompts

Both run the same sweeps on the same prompts with the same metric; the benchmark reports
each one's time, the ratio, and the largest difference between their results (they
should agree to float precision). It also times attribution patching (one forward and
one backward pass) against the full per-head, per-position activation-patching sweep it
approximates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
import warnings

import torch
from transformer_lens import patching as tlp

from .. import pairs as PR
from .. import patching as P
from ..models import load_model
from ..standin import GPT2_SMALL_SIZES, standin_model
from .table import row

SECTION = __name__.rsplit(".", 1)[-1].split("_", 1)[1]  # the chapter's slug


# keyword arguments of run() in quick and in full mode
QUICK = {"repeat": 1}
FULL = {"repeat": 3, "gpt2_sizes": True}


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run(
    model=None,
    n_prompts: int = 16,
    corruption: str = "swap_names",
    seed: int = 0,
    repeat: int = 1,
    gpt2_sizes: bool = False,
    gpt2_prompts: int = 4,
) -> dict:
    """Time the library's batched sweeps against TransformerLens's, on the same IOI prompts.

    Returns a dict: for each sweep ("resid_pre", "head_out_all_pos", "head_out_by_pos"),
    ``{sweep}_ours_s``, ``{sweep}_tl_s``, ``{sweep}_speedup`` (TL time / our time) and
    ``{sweep}_max_abs_diff``; and ``attribution_s``, ``head_by_pos_sweep_s`` and
    ``attribution_speedup`` (sweep time / attribution time) with the Pearson correlation
    ``attribution_vs_activation_r`` of the two over every (layer, position, head); the same
    three figures for `integrated_attribution_patch` (5 steps) with the prefix ``integrated_``. Each sweep also
    has ``{sweep}_flops_ours`` and ``{sweep}_flops_tl``: the FLOPs of the matrix products each computes.
    With ``gpt2_sizes``, the same sweeps on a randomly initialised model of gpt2-small's sizes (12 layers,
    d_model 768, 50257-token unembedding; `interplab.standin`) under the key ``gpt2_sizes`` (its head x position
    sweep on TransformerLens's side is estimated: passes x its time per pass in the residual sweep).
    """
    model = model or load_model("tinyworld", device="cpu")
    pairs = PR.ioi_pairs(model, PR.sample_ioi_prompts(n_prompts, seed=seed, template=0, model=model), corruption)
    metric = P.logit_diff_metric(model, pairs)
    out = _sweeps(model, pairs, metric, repeat, by_pos_tl=True)
    out.update(n_prompts=n_prompts, corruption=corruption)
    clean, corrupted, results = pairs["clean"], pairs["corrupted"], out.pop("_results")
    attr, t_attr = _timed(lambda: P.attribution_patch(model, clean, corrupted, metric, "z"), repeat)
    out["attribution_s"] = round(t_attr, 4)
    out["head_by_pos_sweep_s"] = out["head_out_by_pos_ours_s"]
    out["attribution_speedup"] = round(out["head_by_pos_sweep_s"] / t_attr, 2)
    out["attribution_vs_activation_r"] = round(P.pearson(attr, results["head_out_by_pos"]), 4)
    ig, t_ig = _timed(lambda: P.integrated_attribution_patch(model, clean, corrupted, metric, "z", steps=5), repeat)
    out["integrated_attribution_s"] = round(t_ig, 4)
    out["integrated_attribution_speedup"] = round(out["head_by_pos_sweep_s"] / t_ig, 2)
    out["integrated_attribution_vs_activation_r"] = round(P.pearson(ig, results["head_out_by_pos"]), 4)
    if gpt2_sizes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            big = standin_model("gpt2-small", device="cpu", **GPT2_SMALL_SIZES)
        big_pairs = PR.ioi_pairs(big, PR.sample_ioi_prompts(gpt2_prompts, seed=seed, template=0, model=big), corruption)
        answer, wrong = big_pairs["answer"], big_pairs["wrong"]
        # a random model's normalised logit difference divides by about zero: the plain mean logit difference
        big_metric = P.reads_positions(lambda logits: P.logit_diff(logits, answer, wrong).mean(), -1)
        big_out = _sweeps(big, big_pairs, big_metric, 1, by_pos_tl=False)
        big_out.pop("_results")
        big_out["n_prompts"] = gpt2_prompts
        out["gpt2_sizes"] = big_out
    return out


def _sweeps(model, pairs, metric, repeat: int, by_pos_tl: bool) -> dict:
    """Each sweep by interplab and by TransformerLens: times, largest difference, FLOPs of each."""
    clean, corrupted = pairs["clean"].to(model.cfg.device), pairs["corrupted"].to(model.cfg.device)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    sweeps = {
        "resid_pre": (
            lambda: P.patch_layer_pos_sweep(model, clean, corrupted, metric, "resid_pre"),
            lambda: tlp.get_act_patch_resid_pre(model, corrupted, clean_cache, metric),
        ),
        "head_out_all_pos": (
            lambda: P.patch_head_sweep(model, clean, corrupted, metric, "z"),
            lambda: tlp.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric),
        ),
        "head_out_by_pos": (
            lambda: P.patch_head_pos_sweep(model, clean, corrupted, metric, "z"),
            lambda: tlp.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric),
        ),
    }
    batch, n_pos = clean.shape
    cfg = model.cfg
    out: dict = {
        "n_positions": n_pos,
        "threads": torch.get_num_threads(),
        "model_sizes": {k: getattr(cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")},
    }
    results = {}
    passes = {
        "resid_pre": cfg.n_layers * n_pos,
        "head_out_all_pos": cfg.n_layers * cfg.n_heads,
        "head_out_by_pos": cfg.n_layers * n_pos * cfg.n_heads,
    }
    for name, (ours, theirs) in sweeps.items():
        a, t_ours = _timed(ours, repeat)
        out[f"{name}_flops_ours"] = P.last_sweep_flops.get("flops")
        out[f"{name}_flops_tl"] = passes[name] * P.forward_flops(cfg, batch, n_pos)
        if by_pos_tl or name != "head_out_by_pos":
            with contextlib.redirect_stderr(io.StringIO()):  # TransformerLens's progress bars
                b, t_tl = _timed(lambda theirs=theirs: theirs().cpu(), repeat)
            out[f"{name}_max_abs_diff"] = float((a - b).abs().max())
        else:  # thousands of full passes: estimated from its time per pass in the residual sweep
            t_tl = out["resid_pre_tl_s"] / passes["resid_pre"] * passes[name]
            out[f"{name}_tl_estimated"] = True
        results[name] = a
        out[f"{name}_ours_s"] = round(t_ours, 4)
        out[f"{name}_tl_s"] = round(t_tl, 4)
        out[f"{name}_speedup"] = round(t_tl / t_ours, 2)
    out["_results"] = results
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m interplab.bench.ch06_patching",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-n", type=int, default=16, help="prompts")
    p.add_argument("--corruption", default="swap_names")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    a = p.parse_args(argv)
    print(json.dumps(run(n_prompts=a.n, corruption=a.corruption, repeat=a.repeat), indent=1))


def rows(r: dict) -> list[dict]:
    """The table's rows: each sweep's time and FLOPs against TransformerLens's, attribution against the sweep."""
    s = SECTION
    out = []
    names = {
        "resid_pre": "residual stream (layer x position)",
        "head_out_all_pos": "head outputs (layer x head)",
        "head_out_by_pos": "head outputs (layer x position x head)",
    }
    for sizes, res in (("TinyWorld", r), ("gpt2-small sizes", r.get("gpt2_sizes"))):
        if not res:
            continue
        for key, label in names.items():
            if f"{key}_ours_s" not in res:
                continue
            diff = res.get(f"{key}_max_abs_diff")
            note = "peer: transformer_lens.patching; lower is better; " + (
                f"largest absolute difference of the results {diff:.1e}"
                if diff is not None
                else "peer time estimated: its passes x its time per pass in the residual sweep"
            )
            out.append(row(s, f"sweep time, {label}, {sizes} (s)", res[f"{key}_ours_s"], res[f"{key}_tl_s"], note))
            if res.get(f"{key}_flops_ours"):
                out.append(
                    row(
                        s,
                        f"sweep FLOPs, {label}, {sizes}",
                        float(res[f"{key}_flops_ours"]),
                        float(res[f"{key}_flops_tl"]),
                        "matrix products computed; interplab's: only what the patches change (blocks >= l, "
                        "positions >= p, the read position in the last block); peer: a full pass per patch",
                    )
                )
    out.append(
        row(
            s,
            "attribution patching vs the full head x position sweep (s)",
            r["attribution_s"],
            r["head_by_pos_sweep_s"],
            "peer: interplab's activation-patching sweep; lower is better",
        )
    )
    out.append(
        row(
            s,
            "attribution vs activation patching, Pearson r",
            r["attribution_vs_activation_r"],
            None,
            f"first-order estimate; over every (layer, position, head); {r['n_prompts']} IOI prompts "
            f"({r.get('corruption', 'swap_names')})",
        )
    )
    if "integrated_attribution_s" in r:
        out.append(
            row(
                s,
                "integrated attribution patching (5 steps) vs the full sweep (s)",
                r["integrated_attribution_s"],
                r["head_by_pos_sweep_s"],
                "peer: interplab's activation-patching sweep; lower is better",
            )
        )
        out.append(
            row(
                s,
                "integrated attribution vs activation patching, Pearson r",
                r["integrated_attribution_vs_activation_r"],
                None,
                "gradient averaged along the embedding path; same prompts and heads",
            )
        )
    return out


if __name__ == "__main__":
    main()
