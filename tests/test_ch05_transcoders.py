"""Chapter 5 (transcoders): the shipped transcoders against the outside world.

- they load into SAELens 6's transcoder classes and give the same outputs;
- with every MLP of the bundled model replaced at once, they recover at least 80% of the
  loss gap between the clean model and the model with zero-ablated MLPs;
- the hooks they read and write really are the MLP's input and output.
"""

from __future__ import annotations

import pytest
import torch

from interplab.dictionaries import Transcoder, TranscoderConfig, circuits, metrics, shipped, train_transcoder
from interplab.dictionaries import data as data_module
from interplab.dictionaries.data import tinyworld_dataset
from interplab.exercises import get
from interplab.grading import run as grade
from interplab.solutions import ch05_transcoders as T

N_LAYERS = 4


@pytest.fixture(scope="module")
def data(model):
    _, ids, mask = tinyworld_dataset(40, seed=11, split="test")
    return ids, mask


@pytest.fixture(scope="module")
def pairs(model, data):
    ids, mask = data
    return {L: T.mlp_io_pairs(model, ids, L, mask) for L in range(model.cfg.n_layers)}


def test_every_layer_is_shipped_and_verified(model):
    from interplab.weights import verify

    assert model.cfg.n_layers == N_LAYERS
    for L in range(N_LAYERS):
        for kind in shipped.KINDS:
            folder = shipped.transcoder_folder(L, kind)
            assert verify(folder) == {name: "ok" for name in ("cfg.json", "provenance.json", "sae_weights.safetensors")}
        for skip in (False, True):
            tc = shipped.load_transcoder(L, skip=skip)
            assert tc.cfg.layer == L and tc.cfg.skip == skip
            assert tc.cfg.hook_name == f"blocks.{L}.ln2.hook_normalized"
            assert tc.cfg.hook_name_out == f"blocks.{L}.hook_mlp_out"
            assert not tc.training


def test_hooks_are_the_mlp_input_and_output(model, pairs):
    """Running the MLP itself on the cached inputs gives the cached outputs."""
    for L, (x, y) in pairs.items():
        with torch.no_grad():
            out = model.blocks[L].mlp(x[None])[0]
        torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_shipped_transcoders_load_into_saelens(model, pairs, skip, tmp_path):
    import sae_lens

    expected_cls = sae_lens.JumpReLUSkipTranscoder if skip else sae_lens.JumpReLUTranscoder
    for L in range(N_LAYERS):
        ours = shipped.load_transcoder(L, skip=skip)
        x, _ = pairs[L]
        theirs = sae_lens.SAE.load_from_disk(shipped.transcoder_folder(L, "skip" if skip else "transcoder"))
        assert type(theirs) is expected_cls
        assert theirs.cfg.d_out == ours.cfg.d_out and theirs.cfg.metadata.hook_name == ours.cfg.hook_name
        converted = ours.to_saelens()
        assert type(converted) is expected_cls
        with torch.no_grad():
            acts = ours.encode(x)
            out = ours(x)
            for other in (theirs.eval(), converted):
                torch.testing.assert_close(other.encode(x), acts, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(other(x), out, rtol=1e-5, atol=1e-5)
        assert 0 < (acts > 0).float().sum(-1).mean() < ours.cfg.d_sae / 4


@pytest.mark.parametrize("skip", [False, True], ids=["Transcoder", "SkipTranscoder"])
def test_relu_transcoders_round_trip_through_saelens(pairs, skip, tmp_path):
    """A standard (ReLU + L1) transcoder maps onto SAELens's plain Transcoder / SkipTranscoder."""
    import sae_lens

    x, y = pairs[1]
    cfg = TranscoderConfig(d_in=x.shape[-1], d_sae=64, architecture="standard", l1_coeff=0.3, skip=skip, layer=1)
    tc = train_transcoder(x, y, cfg, steps=30, batch_size=256, progress=False)
    folder = tc.save(tmp_path / "tc")
    theirs = sae_lens.SAE.load_from_disk(folder)
    assert type(theirs) is (sae_lens.SkipTranscoder if skip else sae_lens.Transcoder)
    again = Transcoder.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), tc(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(x), tc(x))
        torch.testing.assert_close(tc.to_saelens().encode(x), tc.encode(x), rtol=1e-5, atol=1e-5)


def test_topk_transcoders_say_saelens_has_no_class():
    tc = Transcoder(TranscoderConfig(d_in=8, d_sae=16, architecture="topk", k=2))
    with pytest.raises(NotImplementedError, match="TopK"):
        tc.to_saelens()


@pytest.mark.slow
def test_replacement_model_recovers_80_percent(model):
    """Every MLP replaced at once by its shipped transcoder: >= 80% of the clean-vs-ablated loss gap recovered."""
    _, ids, mask = tinyworld_dataset(100, seed=1, split="test")
    for skip in (False, True):
        out = T.replacement_loss(model, shipped.load_transcoders(skip=skip), ids, mask)
        assert out["ce_clean"] < out["ce_replaced"] < out["ce_ablated"]
        assert out["loss_recovered"] >= 0.80, (skip, out)


def test_training_is_reproducible_and_learns(pairs):
    x, y = pairs[0]
    cfg = TranscoderConfig(d_in=x.shape[-1], d_sae=96, architecture="batchtopk", k=8, layer=0)
    a = train_transcoder(x, y, cfg, steps=40, batch_size=256, progress=False)
    b = train_transcoder(x, y, cfg, steps=40, batch_size=256, progress=False)
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.threshold, b.threshold)
    with torch.no_grad():
        untrained = Transcoder(cfg)
        untrained.b_dec.copy_(y.mean(0))
        assert T.transcoder_loss(a, x, y)[1] < 0.8 * T.transcoder_loss(untrained.eval(), x, y)[1]
    assert torch.allclose(a.W_dec.norm(dim=-1), torch.ones(96), atol=1e-4)


def test_bad_inputs_fail_clearly(model):
    t0, t2 = shipped.load_transcoder(0), shipped.load_transcoder(2)
    with pytest.raises(ValueError, match="before"):
        T.pullback(t2, t0, 0)
    with pytest.raises(ValueError, match="feature"):
        T.de_embedding(model, t0, 10_000)
    with pytest.raises(ValueError, match="d_in"):
        t0.encode(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="same MLP"):
        T.replacement_loss(model, [t0, t0], torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one prompt"):
        T.answer_attribution(model, [t0], torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="architecture"):
        TranscoderConfig(d_in=4, d_sae=8, architecture="gated")


@pytest.mark.parametrize("heads_as_sources", [False, True], ids=["heads_transparent", "heads_as_sources"])
@pytest.mark.parametrize("which", ["all", "skip", "layers_1_3"])
def test_attributions_of_every_source_add_up_to_the_target(model, heads_as_sources, which):
    """The completeness identity: in the frozen replacement model, the attributions of all sources plus the biases
    equal the target computed by the real model, for a logit lead, a feature's pre-activation and a head's output."""
    from interplab import tinyworld

    tcs = {
        "all": shipped.load_transcoders(),
        "skip": shipped.load_transcoders(skip=True),
        "layers_1_3": [shipped.load_transcoder(3), shipped.load_transcoder(1)],
    }[which]
    for person in ("Alice", "Karl"):
        ids = torch.tensor(tinyworld.encode(circuits.fact_prompt(person)))
        city = tinyworld.WORLD.value(person, "city")
        lead = circuits.contrast_weights(city, tinyworld.CITIES, model.cfg.d_vocab)
        frozen = circuits.FrozenReplacement(model, tcs, ids, heads_as_sources=heads_as_sources)
        with torch.no_grad():
            logits, cache = model.run_with_cache(ids[None])
        attr = frozen.attribute(circuits.logit_target(lead))
        real = float(logits[0, -1] @ lead)
        assert sum(circuits.kind_totals(attr).values()) == pytest.approx(real, abs=1e-3)
        assert float(attr["target"]) == pytest.approx(real, abs=1e-4)
        assert (which == "layers_1_3") == bool(attr["mlps"].abs().sum() > 0)
        assert heads_as_sources == bool(attr["attention"].abs().sum() > 0)
        # a feature's pre-activation, as the real model computes it
        i = next(j for j, tc in enumerate(tcs) if tc.cfg.layer == 3)
        f = int(tcs[i].encode(cache["blocks.3.ln2.hook_normalized"][0, -1]).argmax())
        with torch.no_grad():
            pre = float(tcs[i].pre_acts(cache["blocks.3.ln2.hook_normalized"][0, -1])[f])
        into = frozen.attribute(circuits.feature_target(i, len(ids) - 1, f))
        assert sum(circuits.kind_totals(into).values()) == pytest.approx(pre, abs=1e-3)
        assert float(into["features"][i].abs().sum()) == 0.0  # a feature does not feed its own layer
        # a head's output, as the real model computes it
        direction = torch.linspace(-1, 1, model.cfg.d_head)
        z = float(cache["blocks.2.attn.hook_z"][0, 3, 1] @ direction)
        into = frozen.attribute(circuits.head_target(2, 1, 3, direction))
        assert sum(circuits.kind_totals(into).values()) == pytest.approx(z, abs=1e-3)


def test_the_exercise_is_the_library_s_feature_and_error_attribution(model):
    from interplab import tinyworld

    tcs = shipped.load_transcoders()
    ids = torch.tensor(tinyworld.encode(circuits.fact_prompt("Alice")))
    answer = tinyworld.token_id(tinyworld.WORLD.value("Alice", "city"))
    feat, err = T.answer_attribution(model, tcs, ids, answer)
    assert feat.shape == (N_LAYERS, len(ids), tcs[0].cfg.d_sae) and err.shape == (N_LAYERS, len(ids))
    one_hot = torch.zeros(model.cfg.d_vocab)
    one_hot[answer] = 1.0
    full = circuits.FrozenReplacement(model, tcs, ids).attribute(circuits.logit_target(one_hot))
    torch.testing.assert_close(feat, full["features"])
    torch.testing.assert_close(err, full["errors"])
    with torch.no_grad():
        logit = float(model(ids[None])[0, -1, answer])
    total = float(feat.sum() + err.sum() + full["embeddings"].sum() + full["biases"])
    assert total == pytest.approx(logit, abs=1e-3)


def test_a_feature_to_feature_edge_is_activation_times_pullback(model):
    """With heads as sources, the only path between two features at one position is the residual stream: the edge is
    the earlier feature's activation times the pullback of its centred decoder row, over the frozen LayerNorm scale."""
    from interplab import tinyworld

    tcs = shipped.load_transcoders()
    ids = torch.tensor(tinyworld.encode(circuits.fact_prompt("Bob")))
    p = len(ids) - 1
    frozen = circuits.FrozenReplacement(model, tcs, ids, heads_as_sources=True)
    later = int(frozen.live["acts"][2][0, p].argmax())
    into = frozen.attribute(circuits.feature_target(2, p, later))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[None])
    scale = float(cache["blocks.2.ln2.hook_scale"][0, p])
    acts0 = frozen.live["acts"][0][0, p].detach()
    centred = tcs[0].W_dec - tcs[0].W_dec.mean(-1, keepdim=True)
    pb = centred @ tcs[2].W_enc[:, later]
    torch.testing.assert_close(into["features"][0, p], (acts0 * pb / scale).detach(), rtol=1e-4, atol=1e-5)


def test_fact_recall_lead_by_kind_of_source(model):
    """On the bundled model, the right city's lead is carried by transcoder features at the question mark (about
    85%) and error terms (about 16%); embeddings, biases and features at the name carry almost nothing; the heads
    write a small negative share into the last position directly. The city features are selective on held-out
    prompts."""
    check = circuits.fact_recall_check(model, shipped.load_transcoders())
    assert check["model_correct"] == 1.0 and len(check["rows"]) == 40
    for row in check["rows"]:
        assert sum(row["shares"].values()) == pytest.approx(1.0, abs=1e-4)
        assert sum(row["direct_shares"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["attributed"] == pytest.approx(row["lead"], abs=1e-3)
    shares, direct = check["shares"], check["direct_shares"]
    assert 0.75 <= shares["features"][0] <= 0.92 and shares["features"][1] < 0.04
    assert 0.08 <= shares["errors"][0] <= 0.25
    assert abs(shares["embeddings"][0]) < 0.02 and abs(shares["biases"][0]) < 0.03
    assert shares["attention"] == (0.0, 0.0) and shares["mlps"] == (0.0, 0.0)
    assert -0.1 <= direct["attention"][0] <= -0.02
    assert abs(check["feature_share_at_name"][0]) < 0.01
    mean, sem = check["held_out_selectivity"]
    assert mean >= 0.95 and check["n_held_out_selective"] >= 36
    assert set(check["value_features_at"]) <= {f"MLP {L} at ?" for L in range(N_LAYERS)}
    assert check["person_feature"] <= 0.05  # the "person feature" hypothesis fails: one feature fires on every name


def test_zeroing_mlp1_flips_eve_to_another_city_and_three_accounts_of_it(model):
    from interplab import tinyworld

    flips = circuits.mlp_ablation_flips(model)
    by_layer = {L: [f for f in flips if f["layer"] == L] for L in range(N_LAYERS)}
    assert len(by_layer[0]) >= 35 and 10 <= len(by_layer[1]) <= 25 and not by_layer[2] and not by_layer[3]
    case = next(f for f in flips if f["ablated"] in tinyworld.CITIES)
    assert (case["person"], case["layer"], case["truth"], case["ablated"]) == ("Eve", 1, "Paris", "Sydney")
    assert case["lead_clean"] > 10 > 0 > case["lead_ablated"]
    ids = torch.tensor(tinyworld.encode(circuits.fact_prompt("Eve")))
    w = torch.zeros(model.cfg.d_vocab)
    w[tinyworld.token_id("Paris")], w[tinyworld.token_id("Sydney")] = 1.0, -1.0
    units = circuits.compare_mlp_units(
        model, shipped.load_transcoder(1), shipped.load_sae_baseline(1), ids, len(ids) - 1, w, values=tinyworld.CITIES
    )
    neurons = units["MLP neurons"]
    assert neurons["error"] == pytest.approx(0.0, abs=1e-4)
    for u in units.values():
        assert u["explained"] + u["error"] + u["biases"] == pytest.approx(u["total"], abs=1e-5)
        assert u["total"] == pytest.approx(neurons["total"])
    assert units["transcoder"]["active"] < neurons["active"] and units["SAE on the MLP output"]["active"] < 30
    assert units["SAE on the MLP output"]["units_for_share"] < neurons["units_for_share"]


def test_rate_interval():
    lo, hi = circuits.rate_interval(39, 40)
    assert lo == pytest.approx(0.8713, abs=1e-3) and hi == pytest.approx(0.9956, abs=1e-3)
    assert circuits.rate_interval(0, 40)[0] == 0.0
    with pytest.raises(ValueError, match="trial"):
        circuits.rate_interval(0, 0)


def test_attribution_graph_draws(model):
    import matplotlib

    matplotlib.use("Agg")
    from interplab import tinyworld

    tcs = shipped.load_transcoders()
    ids = torch.tensor(tinyworld.encode(circuits.fact_prompt("Bob")))
    graph = circuits.attribution_graph(
        model, tcs, ids, tinyworld.token_id(tinyworld.WORLD.value("Bob", "city")), n_nodes=5, max_nodes=14
    )
    kinds = {n["kind"] for n in graph["nodes"]}
    assert len(graph["nodes"]) == 14 and {"feature", "head"} <= kinds
    assert sum(graph["totals"].values()) == pytest.approx(graph["target"], abs=1e-3)
    fig = circuits.draw_attribution_graph(graph, [circuits.node_label(model, tcs, n) for n in graph["nodes"]])
    legend = fig.axes[0].get_legend()
    assert legend is not None and "attention head (OV)" in [t.get_text() for t in legend.get_texts()]


@pytest.mark.slow
def test_bench_quick():
    from interplab.bench.ch05_transcoders import run

    out = run(quick=True)
    assert 0.8 <= out["loss_recovered"] <= 1.0


# -------------------------------------------------------------------------------------
# The real-model route: memory-bounded losses on a GPT-2-shaped stand-in
# -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin_data():
    """A small random GPT-2-architecture model with a byte-level BPE tokenizer, and TinyWorld text through it."""
    from interplab import tinyworld
    from interplab.standin import standin_model

    m = standin_model("gpt2-small", device="cpu")
    toks = tinyworld.tokens_for(m, tinyworld.generate(24, seed=6, split="test"))
    mask = toks.mask.clone()
    mask[:, 0] = False
    tcs = [
        Transcoder(TranscoderConfig(d_in=m.cfg.d_model, d_sae=96, architecture="batchtopk", k=8, layer=L))
        for L in range(m.cfg.n_layers)
    ]
    for tc in tcs:
        tc.eval()
    return m, toks.ids, mask, tcs


def test_splice_ce_in_batches_matches_one_pass(standin_data):
    m, ids, mask, tcs = standin_data
    per_row = ids.shape[1] * m.cfg.d_vocab * 4 / 1e9
    replace = {1: lambda x, y: tcs[1](x)}
    whole = metrics.splice_ce(m, ids, mask, replace, max_logits_gb=float("inf"))
    assert metrics.splice_ce(m, ids, mask, replace, max_logits_gb=5 * per_row) == pytest.approx(whole, rel=1e-5)
    assert whole != pytest.approx(metrics.splice_ce(m, ids, mask, {}), rel=1e-4)  # the replacement does something


def test_replacement_loss_in_batches_matches_one_pass(standin_data):
    m, ids, mask, tcs = standin_data
    per_row = ids.shape[1] * m.cfg.d_vocab * 4 / 1e9
    whole = T.replacement_loss(m, tcs, ids, mask)
    batched = metrics.splice_in_batches(T.replacement_loss, m, tcs, ids, mask, max_logits_gb=7 * per_row)
    assert set(batched) == set(whole)
    for k in whole:
        assert batched[k] == pytest.approx(whole[k], rel=1e-4, abs=1e-5), k


def test_compare_layer_runs_on_a_gpt2_shaped_model(standin_data):
    m, ids, mask, tcs = standin_data
    rows = metrics.compare_layer(m, 2, tcs[2], ids, mask)
    assert [r["method"] for r in rows] == [metrics.METHOD_NAMES["transcoder"]]
    assert rows[0]["layer"] == 2 and rows[0]["ce_zero"] > 0


# -------------------------------------------------------------------------------------
# The library and the answer key agree on every case of the exercises the library implements
# -------------------------------------------------------------------------------------


class _ForwardAndActs(torch.nn.Module):
    def __init__(self, tc: Transcoder):
        super().__init__()
        self.tc = tc

    def forward(self, x):
        return self.tc(x), self.tc.encode(x)


def _lib_transcoder_forward(x, W_enc, b_enc, W_dec, b_dec, W_skip=None):
    """The library's Transcoder run on the given weights (functional_call keeps them in the autograd graph)."""
    cfg = TranscoderConfig(
        d_in=W_enc.shape[0],
        d_sae=W_enc.shape[1],
        d_out=W_dec.shape[1],
        architecture="standard",
        skip=W_skip is not None,
    )
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "W_skip": W_skip}
    params = {f"tc.{k}": v for k, v in weights.items() if v is not None}
    return torch.func.functional_call(_ForwardAndActs(Transcoder(cfg).eval()), params, (x,), strict=False)


def _lib_transcoder_loss(transcoder, x, y):
    out = transcoder.loss(x, y)
    return out.loss, out.mse, out.l1


def _lib_answer_attribution(model, transcoders, tokens, answer_id):
    with torch.no_grad():
        one_hot = torch.zeros(model.cfg.d_vocab)
        one_hot[answer_id] = 1.0
    attr = circuits.FrozenReplacement(model, transcoders, tokens).attribute(circuits.logit_target(one_hot))
    return attr["features"], attr["errors"]


LIBRARY = {
    "transcoder_forward": _lib_transcoder_forward,
    "mlp_io_pairs": data_module.mlp_io_pairs,
    "transcoder_loss": _lib_transcoder_loss,
    "replacement_loss": metrics.replacement_loss,
    "de_embedding": circuits.de_embedding,
    "answer_attribution": _lib_answer_attribution,
}


def _close(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, str):
        return a == b
    return a == pytest.approx(b, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("name", list(LIBRARY))
def test_library_agrees_with_the_answer_key(name):
    """The library's own implementation passes the exercise, and gives the reference's output (to 1e-6) on its cases."""
    fn = LIBRARY[name]
    report = grade(name, fn)
    assert report.passed, report
    ex = get(name)
    for case in ex.cases():
        ours, theirs = case.invoke(fn), case.invoke(ex.reference)
        assert _close(ours(*case.args, **case.kwargs), theirs(*case.args, **case.kwargs)), case.label


def test_hooking_a_transcoder_feature_changes_the_prediction(pairs):
    tc = shipped.load_transcoder(1, skip=True)
    x = pairs[1][0][:20]
    out, cache = tc.run_with_cache(x)
    with torch.no_grad():
        acts = tc.encode(x)
        assert torch.equal(cache["hook_sae_acts_post"], acts)
        assert torch.allclose(cache["hook_sae_output"], cache["hook_sae_recons"] + x @ tc.W_skip.T, atol=1e-6)
        feature = int(acts.sum(0).argmax())
        boosted = tc.run_with_hooks(
            x, fwd_hooks=[("hook_sae_acts_post", lambda a, hook: a + 5.0 * (torch.arange(a.shape[-1]) == feature))]
        )
    assert torch.allclose(boosted - out, (5.0 * tc.W_dec[feature]).expand_as(out).detach(), atol=1e-4)
