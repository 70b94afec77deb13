"""check() and run(): reports, fallbacks, and protection against anything a learner's function does."""

import sys

import pytest
import torch

import interplab
from interplab.exercises import get
from interplab.grading import ExerciseFailed, exercise_names, reference, run, show_solution, stats
from interplab.solutions import ch00_orientation as sol

pytestmark = pytest.mark.usefixtures("one_sandbox_at_a_time")  # see tests/conftest.py


def test_passing_function_is_returned(capsys):
    def per_token_loss(logits, tokens):
        return sol.per_token_loss(logits, tokens)

    assert interplab.check(per_token_loss) is per_token_loss
    n = len(get("per_token_loss").cases())
    assert f"{n}/{n} checks passed" in capsys.readouterr().out


def test_failing_function_falls_back_to_the_reference_with_a_note(capsys):
    def previous_token_score(pattern):
        return pattern.diagonal(offset=0, dim1=-2, dim2=-1).mean(-1)

    used = interplab.check(previous_token_score)
    out = capsys.readouterr().out
    assert used is reference("previous_token_score")
    assert "First failing case" in out and "Hint:" in out and "offset=-1" in out
    assert "uses the reference solution" in out
    assert "expected" in out and "got" in out


def test_strict_mode_raises(monkeypatch):
    def ablate_head(z, head):
        return z

    with pytest.raises(ExerciseFailed):
        interplab.check(ablate_head, strict=True)
    monkeypatch.setenv("INTERPLAB_STRICT", "1")
    with pytest.raises(ExerciseFailed):
        interplab.check(ablate_head)


def test_explicit_name_and_unknown_name():
    def mine(z, head):
        return sol.ablate_head(z, head)

    assert run("ablate_head", mine).passed
    with pytest.raises(KeyError, match="ablate_heads"):
        interplab.check(lambda z, h: z, name="ablate_heads")
    with pytest.raises(KeyError, match="Did you mean 'ablate_head'"):
        interplab.check(mine, name="ablate_heads")


def test_report_fields():
    r = run("ablate_head", lambda z, head: z * 0)
    assert (r.passed, r.n_passed, r.n_total) == (False, 0, len(get("ablate_head").cases()))
    assert r.failures and isinstance(r.failures[0], str)
    assert r.to_dict()["kind"] == "wrong"


def test_learner_exception_shows_the_learners_line():
    code = "def per_token_loss(logits, tokens):\n    x = logits.log_softmax(-1)\n    return x[:, :-1].gather(-1, tokens)  # wrong index shape\n"
    import linecache

    linecache.cache["<learner-cell>"] = (len(code), None, code.splitlines(True), "<learner-cell>")  # as IPython does
    ns = {}
    exec(compile(code, "<learner-cell>", "exec"), ns)
    r = run("per_token_loss", ns["per_token_loss"])
    assert r.kind == "error"
    msg = r.failures[0]
    assert "line 3" in msg and "gather" in msg and "RuntimeError" in msg
    assert "interplab/grading" not in msg


def test_mutating_inputs_is_reported_and_does_not_leak():
    def ablate_head(z, head):
        z[:, :, head] = 0
        return z

    r = run("ablate_head", ablate_head)
    assert r.kind == "mutation" and "modified its input `z`" in r.failures[0]
    assert run("ablate_head", sol.ablate_head).passed  # the cases themselves are intact


def test_wrong_type_nan_and_shape_are_explained():
    r = run("head_ablation_loss", lambda model, tokens, layer, head: torch.tensor(1.0))
    assert "use .item()" in r.failures[0]
    r = run("previous_token_score", lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1) * float("nan"))
    assert "NaN" in r.failures[0]
    r = run("previous_token_score", lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1))
    assert "wrong shape" in r.failures[0]
    r = run("previous_token_score", lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1).half())
    assert "wrong dtype" in r.failures[0] and "loses precision" in r.failures[0]
    r = run("previous_token_score", lambda p: p.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1).long())
    assert "wrong dtype" in r.failures[0] and "floating-point" in r.failures[0]

    # the course's dtype policy: float64 is as good as float32
    def in_float64(p):
        if p.shape[-1] < 2:
            raise ValueError("no position has a previous token")
        return p.double().diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)

    assert run("previous_token_score", in_float64).passed
    r = run("answer_logit_diff", lambda l, a, w: [0.0] * len(a))
    assert "expected a torch.Tensor" in r.failures[0]


def test_endless_loop_is_stopped(monkeypatch):
    ex = get("ablate_head")
    monkeypatch.setattr(ex, "time_limit", 0.5)

    def ablate_head(z, head):
        while True:
            pass

    r = run("ablate_head", ablate_head)
    assert r.kind == "timeout" and "stopped" in r.failures[0]


def test_exit_and_enormous_output_do_not_escape(capsys):
    def ablate_head(z, head):
        print("x" * 10_000_000)
        sys.exit(1)

    r = run("ablate_head", ablate_head)
    assert r.kind == "error" and "SystemExit" in r.failures[0]
    assert len(capsys.readouterr().out) < 5000


def test_weights_edited_or_hooks_left_behind_are_undone(model):
    from interplab.exercises import shared_model

    m = shared_model()
    before = m.W_U.clone()

    def head_ablation_loss(model, tokens, layer, head):
        model.W_U.data.mul_(0)
        return sol.head_ablation_loss(model, tokens, layer, head)

    r = run("head_ablation_loss", head_ablation_loss)
    assert not r.passed and "changed the model's weights" in r.failures[0]
    assert torch.equal(m.W_U, before)

    def leaves_hooks(model, tokens, layer, head):
        model.add_hook(f"blocks.{layer}.attn.hook_z", lambda z, hook: sol.ablate_head(z, head))
        return sol.per_token_loss(model(tokens), tokens).mean().item()

    r = run("head_ablation_loss", leaves_hooks)
    assert not r.passed and "left hooks" in r.failures[0]
    assert run("head_ablation_loss", sol.head_ablation_loss).passed  # later exercises are unaffected


def test_grad_mode_is_restored():
    def ablate_head(z, head):
        torch.set_grad_enabled(False)
        return sol.ablate_head(z, head)

    with torch.enable_grad():
        run("ablate_head", ablate_head)
        assert torch.is_grad_enabled()


def test_listing_reference_and_show_solution(capsys):
    assert "per_token_loss" in exercise_names() and exercise_names("00_orientation")
    show_solution("ablate_head")
    assert "def ablate_head" in capsys.readouterr().out
    s = stats()
    assert s["exercises"] == len(exercise_names()) and s["known_mistakes"] > s["exercises"]


def test_not_callable():
    r = run("ablate_head", 42)
    assert not r.passed and "needs a function" in r.failures[0]


def test_the_sandbox_keeps_an_environment_that_lives_under_tmp(monkeypatch, tmp_path):
    """bubblewrap applies mounts in order: the empty /tmp must come before the read-only binds, or a
    checkout or environment under /tmp (as in CI's clones) disappears from the worker's view."""
    from pathlib import Path

    from interplab.grading import sandbox

    monkeypatch.setattr(sandbox, "readonly_paths", lambda: ["/tmp/some_clone/.venv", "/usr"])
    nb = tmp_path / "00_x.ipynb"
    nb.write_text("{}")
    cmd, _ = sandbox.command("bwrap", ["python", "-c", "pass"], tmp_path, nb, 1 << 20)
    tmpfs_tmp = next(i for i in range(len(cmd) - 1) if cmd[i] == "--tmpfs" and cmd[i + 1] == "/tmp")
    bind = next(i for i in range(len(cmd) - 1) if cmd[i] == "--ro-bind" and cmd[i + 1] == "/tmp/some_clone/.venv")
    assert tmpfs_tmp < bind
    assert Path(cmd[cmd.index("--chdir") + 1]) == Path(sandbox.WORKDIR)
