"""Chapter 02 against the outside world (TransformerLens's own logit lens, the shipped tuned lens), `interplab.lenses`,
and the library's own copies of exercises held to the exercises' cases."""

import json
import shutil
import time

import pytest
import torch

from interplab import artifacts, grading
from interplab import lenses as L
from interplab.exercises import get
from interplab.solutions import ch02_lenses as sol
from interplab.weights import CorruptedFileError, verify, write_checksums

SHIPPED = L.default_folder()


@pytest.fixture(scope="module")
def heldout(model):
    """300 test-split documents: text the lens never saw in training."""
    return L.lens_docs(300, seed=1, split="test")


@pytest.mark.parametrize("incl_mid", [False, True])
def test_logit_lens_equals_transformer_lens_route(model, incl_mid):
    from interplab import tinyworld

    ids, _ = tinyworld.batch_tokens(tinyworld.generate(6, seed=3, split="test"))
    with torch.no_grad():
        ours = sol.logit_lens(model, ids, incl_mid=incl_mid)
        _, cache = model.run_with_cache(ids)
        stack, labels = cache.accumulated_resid(incl_mid=incl_mid, return_labels=True)
        theirs = model.unembed(cache.apply_ln_to_stack(stack, recompute_ln=True))
        logits = model(ids)
    assert len(labels) == ours.shape[0] == len(L.lens_hook_names(model.cfg.n_layers, incl_mid))
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours[-1], logits, atol=1e-5, rtol=1e-5)


def test_shipped_files_verify_and_fit_the_bundled_model(model):
    assert all(v == "ok" for v in verify(SHIPPED).values())
    info = json.loads((SHIPPED / L.TUNED_LENS_INFO).read_text())
    assert info["model_sha256"] == artifacts.model_sha256(), (
        "the shipped tuned lens was trained for other TinyWorld weights: run `interplab rebuild --only tuned_lens`"
    )
    assert artifacts.require_model_match(SHIPPED)["artifact"] == "tuned_lens"
    # wall time, or (on a machine shared with other work) the CPU time of the single training thread
    took = min(info["seconds_total"], info["cpu_seconds_total"] if info["torch_threads"] == 1 else float("inf"))
    assert took <= 60 and info["torch_threads"] <= 2, f"training took {took} s (limit 60 s on 2 CPU cores)"
    lens = L.load_tuned_lens(model)
    assert lens.A.shape == (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_model)
    assert lens.A.abs().max() > 0, "the shipped translators are still at their zero initialisation"


def test_shipped_tuned_lens_beats_the_logit_lens_on_heldout_text(model, heldout):
    m = L.evaluate_lenses(model, L.load_tuned_lens(model), heldout)
    for i, label in enumerate(m["labels"][:-1]):
        assert m["kl_tuned"][i] < m["kl_logit"][i], f"{label}: tuned KL {m['kl_tuned'][i]} >= logit {m['kl_logit'][i]}"
        assert m["ce_tuned"][i] < m["ce_logit"][i], f"{label}: tuned CE {m['ce_tuned'][i]} >= logit {m['ce_logit'][i]}"
    assert m["kl_tuned"][-1] == m["kl_logit"][-1] == 0.0  # the last point is the model itself


def test_zero_translators_are_the_logit_lens(model):
    from interplab import tinyworld

    ids, _ = tinyworld.batch_tokens(tinyworld.generate(3, seed=4, split="test"))
    zero = L.TunedLens.for_model(model)
    assert torch.allclose(zero.logits(model, ids), sol.logit_lens(model, ids).detach(), atol=1e-5)


def test_a_corrupted_lens_file_is_caught(tmp_path):
    folder = tmp_path / "tuned_lens"
    shutil.copytree(SHIPPED, folder)
    weights = folder / L.TUNED_LENS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptedFileError, match="corrupted or truncated"):
        L.load_tuned_lens(folder=folder)


def _copy_with_model_hash(tmp_path, sha: str):
    folder = tmp_path / "tuned_lens"
    shutil.copytree(SHIPPED, folder)
    record = json.loads((folder / artifacts.PROVENANCE_FILE).read_text())
    record["model_sha256"] = sha
    (folder / artifacts.PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_checksums(folder)  # a consistent folder: only the model it was trained on differs
    return folder


def test_a_lens_trained_on_other_model_weights_is_refused(tmp_path, model):
    other = "0" * 64
    folder = _copy_with_model_hash(tmp_path, other)
    with pytest.raises(artifacts.ArtifactModelMismatch) as err:
        L.load_tuned_lens(model, folder=folder)
    message = str(err.value)
    assert other in message and artifacts.model_sha256() in message
    assert "interplab rebuild --only tuned_lens" in message
    # the same folder with the bundled model's hash loads
    assert L.load_tuned_lens(model, folder=_copy_with_model_hash(tmp_path / "ok", artifacts.model_sha256())).A.shape[0]


def test_a_lens_without_provenance_is_refused(tmp_path):
    folder = tmp_path / "tuned_lens"
    shutil.copytree(SHIPPED, folder)
    (folder / artifacts.PROVENANCE_FILE).unlink()
    write_checksums(folder)
    with pytest.raises(CorruptedFileError, match="interplab rebuild --only tuned_lens"):
        L.load_tuned_lens(folder=folder)


def test_a_lens_for_another_model_is_refused():
    from interplab.exercises.ch02_lenses import _tiny_model

    with pytest.raises(ValueError, match="train_tuned_lens"):
        L.load_tuned_lens(_tiny_model())


def test_short_training_lowers_the_loss(model):
    _, info = L.train_tuned_lens(model, n_docs=100, steps=30, batch_size=256, progress=False)
    assert info["last_loss"] < 0.8 * info["first_loss"]
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_training_settings_come_from_the_config():
    cfg = L.TunedLensConfig()
    assert (cfg.n_docs, cfg.seed, cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay) == (
        2000,
        0,
        1000,
        512,
        1e-2,
        0.0,
    )
    assert artifacts.recipe("tuned_lens") == cfg
    assert cfg.with_overrides(steps=5).steps == 5 and cfg.steps == 1000
    with pytest.raises(TypeError, match="unknown tuned-lens settings"):
        cfg.with_overrides(stepz=5)


def test_build_artifact_writes_a_verified_folder_for_the_bundled_model(tmp_path, monkeypatch):
    """`interplab rebuild --only tuned_lens`, with a tiny recipe, into a temporary weights folder."""
    import interplab.weights

    weights_dir = tmp_path / "weights"
    shutil.copytree(interplab.weights.WEIGHTS_DIR / "tinyworld", weights_dir / "tinyworld")
    monkeypatch.setattr(interplab.weights, "WEIGHTS_DIR", weights_dir)
    monkeypatch.setattr(artifacts, "WEIGHTS_DIR", weights_dir)
    tiny = L.TunedLensConfig(n_docs=30, steps=5, batch_size=64, eval_docs=10)
    L.build_artifact("tuned_lens", progress=False, config=tiny)
    folder = weights_dir / "tuned_lens"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [L.TUNED_LENS_FILE, L.TUNED_LENS_INFO, artifacts.PROVENANCE_FILE, "SHA256SUMS"]
    )
    assert all(v == "ok" for v in verify(folder).values())
    record = artifacts.require_model_match(folder)
    assert record["recipe"] == {
        "n_docs": 30,
        "seed": 0,
        "steps": 5,
        "batch_size": 64,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "eval_docs": 10,
    }
    info = json.loads((folder / L.TUNED_LENS_INFO).read_text())
    assert (
        info["steps"] == 5
        and info["heldout_eval"]["docs"] == 10
        and info["command"] == "interplab rebuild --only tuned_lens"
    )
    assert L.load_tuned_lens(folder=folder).A.abs().max() > 0
    assert [p.name for p in weights_dir.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind
    with pytest.raises(ValueError, match="tuned_lens"):
        L.build_artifact("sae_topk", progress=False, config=tiny)


# --- the library's copies of exercises agree with the answer key ---------------------------------------------


@pytest.mark.parametrize(
    "name", ["kl_to_final", "lens_entropy", "correct_token_rank", "tuned_lens_logits", "tuned_lens_loss"]
)
def test_library_copy_passes_the_exercise_and_equals_the_reference(name):
    ours = getattr(L, name)
    report = grading.run(name, ours)
    assert report.passed, report
    ex = get(name)
    with torch.no_grad():
        for case in ex.cases():
            a, b = ours(*case.args, **case.kwargs), ex.reference(*case.args, **case.kwargs)
            assert a.dtype == b.dtype and torch.equal(a, b), case.label


def _library_fit(model, resid, final_logits, steps, batch_size, lr, seed=0, progress=False):
    """The library's training loop (the one that trained the shipped translators) in the exercise's shape."""
    lens = L.TunedLens(resid.shape[-1], resid.shape[0])
    recipe = L.TunedLensConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    losses, lrs = L.fit_translators(model, lens, resid, final_logits, recipe, progress=progress)
    return lens.A.detach(), lens.b.detach(), losses, lrs


def test_library_training_loop_passes_the_exercise_and_equals_the_reference():
    report = grading.run("fit_tuned_lens", _library_fit)
    assert report.passed, report
    for case in get("fit_tuned_lens").cases()[:2]:  # the two training runs: the same draws, the same steps
        ours, ref = _library_fit(*case.args), sol.fit_tuned_lens(*case.args)
        for a, b in zip(ours, ref):
            assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), case.label


def test_the_schedule_warms_up_then_decays_towards_zero():
    factors = [L.lr_factor(s, 100) for s in range(100)]
    assert factors[0] == 0.2 and factors[4] == 1.0 and max(factors) == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:])) and factors[-1] == 1 / 95


# --- the causal check of the lens readings of fact recall (what the chapter's section 6 prints) ----------------


@pytest.fixture(scope="module")
def fact_docs():
    return L.fact_prompts()


def test_fact_prompts_cover_the_cast_and_the_model_recalls_them(model, fact_docs):
    from interplab import tinyworld

    assert len(fact_docs) == 3 * len(tinyworld.CAST) * 2 - len(tinyworld.WORLD.heldout_queries)
    right, logp = L.answer_scores(model, fact_docs)
    assert right.mean() == 1.0 and logp.mean() > -0.01


def test_mean_ablating_mlp0_or_mlp1_at_the_last_position_hurts_fact_recall_and_later_mlps_do_not(model, fact_docs):
    """The lens check of section 6 on the bundled model: the lookup is spread over MLP 0 (more) and MLP 1."""
    recall = {}
    for component, layer in [("mlp_out", 0), ("mlp_out", 1), ("mlp_out", 2), ("mlp_out", 3), ("attn_out", 0)]:
        right, _ = L.template_mean_ablation(model, fact_docs, component, layer)
        recall[component, layer] = (float(right.mean()), L.bootstrap_ci(right))
    mlp0, mlp1 = recall["mlp_out", 0], recall["mlp_out", 1]
    assert 0.45 <= mlp0[0] <= 0.70 and mlp0[1][1] < 0.75, recall  # printed: 0.58 [0.52, 0.65]
    assert 0.70 <= mlp1[0] <= 0.90 and mlp1[1][1] < 0.95, recall  # printed: 0.81 [0.75, 0.86]
    assert mlp0[1][1] < mlp1[1][0], f"MLP 0 should matter more than MLP 1: {recall}"  # intervals do not overlap
    assert recall["mlp_out", 2][0] >= 0.98 and recall["mlp_out", 3][0] >= 0.98, recall
    assert recall["attn_out", 0][0] <= 0.3, recall  # attention 0 brings the name


def test_template_mean_ablation_keeps_what_every_version_shares(model, fact_docs):
    """Replacing a sublayer's output by the mean over ONE prompt (its own group of one) changes nothing."""
    one = [fact_docs[0]]
    right, logp = L.template_mean_ablation(model, one, "mlp_out", 0)
    clean_right, clean_logp = L.answer_scores(model, one)
    assert torch.equal(right, clean_right) and torch.allclose(logp, clean_logp, atol=1e-5)


def test_a_shuffled_copy_scrambles_only_the_named_parameters(model):
    other = L.shuffled_copy(model, "blocks.0.mlp")
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        if name.startswith("blocks.0.mlp"):
            assert not torch.equal(p, q) and torch.equal(p.flatten().sort().values, q.flatten().sort().values), name
        else:
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="no parameter"):
        L.shuffled_copy(model, "blocks.9.")


def test_residual_at_lines_up_with_collect_lens_data(model):
    from interplab import tinyworld

    ids, mask = tinyworld.batch_tokens(tinyworld.generate(20, seed=6, split="train"))
    keep = L.positions_to_read(mask)
    resid, _, _, _ = L.collect_lens_data(model, ids, keep, batch_size=7)
    point = L.lens_hook_names(model.cfg.n_layers)[1]
    assert torch.allclose(L.residual_at(model, ids, keep, point, batch_size=5), resid[1], atol=1e-5)


def test_a_translator_reads_facts_after_block_0_even_when_no_mlp_looked_them_up(model, fact_docs):
    """The control of section 6, on a small budget: a translator after block 0 of the model with MLP 0 shuffled
    still reads most facts (the lookup fits in the translator), far above guessing."""
    from interplab import tinyworld

    ids, mask = tinyworld.batch_tokens(L.lens_docs(600, seed=0))
    keep = L.positions_to_read(mask)
    point = L.lens_hook_names(model.cfg.n_layers)[1]
    _, final, _, _ = L.collect_lens_data(model, ids, keep)
    fact_ids, _ = tinyworld.batch_tokens(fact_docs)
    rows, pos = torch.arange(len(fact_docs)), torch.tensor([d.answer_positions[0] for d in fact_docs])
    answers = torch.tensor([tinyworld.token_id(d.answer[d.answer_positions[0]]) for d in fact_docs])
    recall = {}
    for name, variant in [("real", model), ("mlp0 shuffled", L.shuffled_copy(model, "blocks.0.mlp"))]:
        A, b, _, _ = sol.fit_tuned_lens(model, L.residual_at(variant, ids, keep, point)[None], final, 300, 512, 1e-2)
        with torch.no_grad():
            read = L.tuned_lens_logits(model, L.residual_stack(variant, fact_ids)[1, rows, pos][None], A, b)[0]
        recall[name] = float((read.argmax(-1) == answers).float().mean())
    assert recall["real"] >= 0.85 and recall["mlp0 shuffled"] >= 0.75, recall  # guessing: 0.19


def test_lens_hook_names_are_the_ones_the_logit_lens_reads(model):
    from interplab import tinyworld

    ids, _ = tinyworld.batch_tokens(tinyworld.generate(2, seed=5, split="test"))
    for incl_mid in (False, True):
        with torch.no_grad():
            stack = L.residual_stack(model, ids, incl_mid)
            assert torch.equal(L.read_out(model, stack), sol.logit_lens(model, ids, incl_mid))
    assert L.lens_hook_names(2, incl_mid=True) == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_mid",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_resid_post",
    ]


def test_prediction_depth_is_zero_only_when_every_point_agrees():
    logits = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 1.0]]])  # top-1: 1, 0, 1
    assert sol.prediction_depth(logits).tolist() == [2]
    assert sol.prediction_depth(logits[[0, 2]]).tolist() == [0]


@pytest.mark.slow
def test_training_takes_at_most_60_seconds_on_2_cores_and_reproduces_the_shipped_lens(model, heldout):
    """Retrain with the shipped settings on one thread: its CPU time bounds the wall time on 2 idle cores."""
    info = json.loads((SHIPPED / L.TUNED_LENS_INFO).read_text())
    assert {k: info[k] for k in ("n_docs", "seed", "steps", "batch_size", "lr", "weight_decay")} == {
        k: getattr(L.TunedLensConfig(), k) for k in ("n_docs", "seed", "steps", "batch_size", "lr", "weight_decay")
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        lens, _ = L.train_tuned_lens(model, progress=False)  # the recipe's defaults ARE the shipped settings
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    assert min(wall, cpu) <= 60, f"training took {wall:.0f} s wall, {cpu:.0f} s CPU"
    shipped = L.load_tuned_lens(model)
    assert torch.allclose(lens.A, shipped.A, atol=1e-3) and torch.allclose(lens.b, shipped.b, atol=1e-3)


# --- the real-model route, offline: a randomly initialised GPT-2-shaped stand-in (see interplab.standin) ---


@pytest.fixture(scope="module")
def gpt2_shaped():
    from interplab.standin import standin_model

    return standin_model("gpt2-small", device="cpu")


def test_lens_data_goes_through_the_models_own_tokenizer(model, gpt2_shaped):
    from interplab import tinyworld

    docs = tinyworld.generate(3, seed=4, split="test")
    ids, mask = L.lens_batch(gpt2_shaped, docs)
    assert not L.is_tinyworld(gpt2_shaped)
    assert (ids[:, 0] == gpt2_shaped.tokenizer.bos_token_id).all()
    for row, m, doc in zip(ids, mask, docs):  # the document's text, in the stand-in's subword tokens
        assert gpt2_shaped.tokenizer.decode(row[m][1:]) == " ".join(doc.tokens[1:])
    assert int(mask.sum()) > sum(len(d.tokens) for d in docs)  # some words split into several tokens
    assert L.is_tinyworld(model) and torch.equal(L.lens_batch(model, docs)[0], tinyworld.batch_tokens(docs)[0])


def test_lenses_and_a_short_tuned_lens_run_on_a_gpt2_shaped_model(gpt2_shaped):
    from interplab import tinyworld

    n_points = gpt2_shaped.cfg.n_layers + 1
    ids, _ = L.lens_batch(gpt2_shaped, tinyworld.generate(4, seed=4, split="test"))
    ll = sol.logit_lens(gpt2_shaped, ids).detach()
    assert ll.shape == (n_points, *ids.shape, gpt2_shaped.cfg.d_vocab)
    assert torch.allclose(ll[-1], gpt2_shaped(ids).detach(), atol=1e-4)  # the last point is the model
    lens, info = L.train_tuned_lens(gpt2_shaped, n_docs=10, steps=20, batch_size=32, progress=False)
    assert (lens.n_layers, lens.d_model) == (gpt2_shaped.cfg.n_layers, gpt2_shaped.cfg.d_model)
    assert info["last_loss"] < info["first_loss"]
    assert lens.logits(gpt2_shaped, ids).shape == ll.shape
    with pytest.raises(ValueError, match="train_tuned_lens"):  # the shipped translators are TinyWorld's
        L.load_tuned_lens(gpt2_shaped)


def test_lens_batches_stay_bounded_for_a_big_vocabulary(model):
    assert L.rows_per_batch(model, 5, 67) == 50  # TinyWorld: the chapter's batches of 50 documents
    big = type("Big", (), {"cfg": type("Cfg", (), {"d_vocab": 50257})()})()
    assert L.rows_per_batch(big, 13, 80) == 1  # gpt2-small: one sequence at a time (never zero)
    assert L.rows_per_batch(big, 2, 10) == 24 and 24 * 2 * 10 * 50257 <= 2.5e7


def test_the_evaluate_command_prints_the_per_point_table(capsys):
    L.main(["--evaluate", "--docs", "5"])
    out = capsys.readouterr().out
    assert "KL tuned" in out and all(label in out for label in L.lens_labels(4))
