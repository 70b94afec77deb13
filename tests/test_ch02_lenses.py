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
