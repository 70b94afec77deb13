"""The gradebook: correct, partly wrong and broken submissions each get the right rows.

The correct submission is answered honestly (tests/honest_ch00.py): a copy of the answer key
would be graded "used_reference". Hostile submissions are in test_grading_hostile.py.
"""

import csv
import json
import subprocess
import sys

import pytest
from honest_ch00 import EXERCISES, notebook

from interplab.grading.gradebook import NoNotebooks, grade
from interplab.grading.notebooks import cell_source, inject_solutions, read_notebook, write_notebook

pytestmark = pytest.mark.usefixtures("one_sandbox_at_a_time")  # see tests/conftest.py


def _replace_def(nb, name, new_source):
    for cell in nb["cells"]:
        src = cell_source(cell)
        if cell["cell_type"] == "code" and f"def {name}(" in src:
            check_line = f"{name} = check({name})"
            cell["source"] = new_source + "\n\n" + (check_line if check_line in src else "")
            return nb
    raise LookupError(name)


@pytest.fixture(scope="module")
def submissions(tmp_path_factory, repo):
    folder = tmp_path_factory.mktemp("submissions")
    shipped = read_notebook(repo / "chapters" / "00_orientation.ipynb")

    write_notebook(notebook(), folder / "00_correct.ipynb")
    write_notebook(inject_solutions(shipped), folder / "00_answer_key.ipynb")

    partly = notebook()
    _replace_def(
        partly,
        "previous_token_score",
        "def previous_token_score(pattern):\n    return pattern.diagonal(offset=0, dim1=-2, dim2=-1).mean(-1)",
    )
    _replace_def(partly, "ablate_head", "def ablate_head(z, head):\n    raise NotImplementedError")
    write_notebook(partly, folder / "00_partly.ipynb")

    broken = notebook()
    _replace_def(broken, "per_token_loss", "def per_token_loss(logits, tokens):\n    return logits[:, :-1 +")
    _replace_def(broken, "answer_logit_diff", "def answer_logits_difference(logits, a, w):\n    return 0")
    _replace_def(
        broken,
        "previous_token_score",
        "import sys\ndef previous_token_score(pattern):\n    print('spam' * 10**6)\n    sys.exit(0)",
    )
    _replace_def(broken, "ablate_head", "def ablate_head(z, head):\n    while True:\n        pass")
    _replace_def(
        broken, "head_ablation_loss", "import os\ndef head_ablation_loss(model, tokens, layer, head):\n    os._exit(7)"
    )
    write_notebook(broken, folder / "00_broken.ipynb")

    (folder / "00_garbage.ipynb").write_text("{ this is not json")
    return folder


@pytest.fixture(scope="module")
def rows(submissions):
    out = submissions.parent / "grades.csv"
    return grade([submissions], out=out, time_limit=5, progress=False), out


def _status(rows, sub, exercise):
    return next(r for r in rows if r.submission == sub and r.exercise == exercise)


def test_correct_submission_passes_everything(rows):
    rows, _ = rows
    total = _status(rows, "00_correct.ipynb", "TOTAL")
    assert total.status == "passed" and total.n_passed == total.n_total == len(EXERCISES)


def test_partly_wrong_submission(rows):
    rows, _ = rows
    assert _status(rows, "00_partly.ipynb", "per_token_loss").status == "passed"
    wrong = _status(rows, "00_partly.ipynb", "previous_token_score")
    assert wrong.status == "failed" and "Hint" in wrong.message
    assert _status(rows, "00_partly.ipynb", "ablate_head").status == "not_implemented"
    assert _status(rows, "00_partly.ipynb", "TOTAL").n_passed == len(EXERCISES) - 2


def test_broken_submission_gets_a_clear_row_for_each_fault(rows):
    rows, _ = rows
    sub = "00_broken.ipynb"
    assert _status(rows, sub, "per_token_loss").status == "syntax_error"
    missing = _status(rows, sub, "answer_logit_diff")
    assert missing.status == "missing" and "deleted" in missing.message
    exited = _status(rows, sub, "previous_token_score")
    assert exited.status == "error" and "SystemExit" in exited.message and len(exited.message) < 3000
    assert _status(rows, sub, "ablate_head").status == "timeout"
    crashed = _status(rows, sub, "head_ablation_loss")
    assert crashed.status == "crashed" and "exit code 7" in crashed.message
    assert _status(rows, sub, "TOTAL").n_passed == 0


def test_a_copy_of_the_answer_key_is_not_a_pass(rows):
    rows, _ = rows
    mine = [r for r in rows if r.submission == "00_answer_key.ipynb" and r.exercise != "TOTAL"]
    assert mine and all(r.status == "used_reference" and r.score == 0 for r in mine), mine


def test_unreadable_notebook(rows):
    rows, _ = rows
    r = [r for r in rows if r.submission == "00_garbage.ipynb" and r.exercise != "TOTAL"]
    assert r and all(x.status == "unreadable" and "JSON" in x.message for x in r)


def test_csv_and_json_have_every_row(rows):
    rows, out = rows
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 5 * (len(EXERCISES) + 1)
    assert json.loads(out.with_suffix(".json").read_text())[0].keys() == table[0].keys()


def test_cli_check_reports_on_one_notebook(submissions):
    r = subprocess.run(
        [sys.executable, "-m", "interplab.cli", "check", str(submissions / "00_partly.ipynb")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 1
    assert f"{len(EXERCISES) - 2}/{len(EXERCISES)} exercises passed" in r.stdout and "previous_token_score" in r.stdout


def test_nothing_to_grade_is_an_error_that_says_so(tmp_path):
    with pytest.raises(NoNotebooks, match="holds no .ipynb files"):
        grade([tmp_path], progress=False)
    r = subprocess.run(
        [sys.executable, "-m", "interplab.cli", "grade", str(tmp_path), "--out", str(tmp_path / "g.csv")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "nothing to grade" in r.stderr and not (tmp_path / "g.csv").exists()


def test_a_notebook_is_matched_to_its_chapter_by_id_then_slug_then_number():
    from pathlib import Path

    from interplab.grading.gradebook import chapter_of

    assert chapter_of(Path("04_saes.ipynb")) == "04_saes"
    assert chapter_of(Path("04_saes_alice.ipynb")) == "04_saes"
    # saved before the SAE, transcoder and patching chapters moved up one number: graded by slug
    assert chapter_of(Path("03_saes.ipynb")) == "04_saes"
    assert chapter_of(Path("05_patching-bob.ipynb")) == "06_patching"
    assert chapter_of(Path("04_transcoders.ipynb")) == "05_transcoders"
    assert chapter_of(Path("00_anything.ipynb")) == "00_orientation"
    assert chapter_of(Path("notes.ipynb")) is None
