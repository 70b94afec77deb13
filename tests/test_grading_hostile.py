"""The gradebook against a determined student: hostile, broken and honest chapter-00 notebooks.

Every notebook below is generated here, in a temporary folder, and the whole folder is graded in
one `grade()` call (bubblewrap when it works here; a smaller set without a sandbox as well).
Each hostile notebook attacks one exercise (``ablate_head`` unless said otherwise) and answers
the others honestly, so each test asserts the exact row of the attacked exercise AND that every
other row is a pass. Honest controls, written in every ordinary notebook shape, must get full marks.

Run:  OMP_NUM_THREADS=1 python -m pytest tests/test_grading_hostile.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import stat
import time
from pathlib import Path

import pytest
from honest_ch00 import EXERCISES, HONEST, code_cell, exercise_cell_index, notebook, source

import interplab
from interplab.exercises import get
from interplab.grading import sandbox
from interplab.grading.gradebook import Limits, grade

pytestmark = pytest.mark.usefixtures("one_sandbox_at_a_time")  # see tests/conftest.py

MARK = "interplab-hostile-4f2a"  # processes a hostile notebook starts carry this in their command line
LIMITS = Limits(case_cpu=3.0, cell_cpu=20.0, idle=6.0, memory=6 << 30, nproc=48)
PACKAGE = Path(interplab.__file__).parent

ALL_PASS = {n: "passed" for n in EXERCISES}


def with_ablate(body: str, extra_cells: list[str] = (), before_def: str = "") -> dict:
    """Honest notebook whose ablate_head cell is ``before_def`` + ``body``, with code cells added before it."""
    i = exercise_cell_index(notebook(), "ablate_head")
    nb = notebook({"ablate_head": before_def + body})
    for k, src in enumerate(extra_cells):
        nb["cells"].insert(i + k, code_cell(src, f"extra{k}"))
    return nb


# --- the attacks -----------------------------------------------------------------------------------


def attacks(folder: Path, others: dict[str, Path]) -> dict[str, tuple[dict, dict[str, str]]]:
    """{file name: (notebook, expected status of each exercise)}"""
    classmate, gradebook = others["classmate"], others["gradebook"]
    out: dict[str, tuple[dict, dict[str, str]]] = {}

    def add(name: str, nb: dict, **expected: str) -> None:
        out[f"00_{name}.ipynb"] = (nb, {**ALL_PASS, **expected})

    wrong = "    return z\n"  # the attacks' own answer: the input unchanged (wrong)
    add(
        "tamper_compare_in_body",
        with_ablate(
            "def ablate_head(z, head):\n"
            "    import torch, interplab.grading.compare as c, interplab.grading.core as core\n"
            "    torch.isclose = lambda *a, **k: torch.ones((), dtype=torch.bool)\n"
            "    torch.allclose = lambda *a, **k: True\n"
            "    c.compare = core._compare = lambda *a, **k: None\n"
            "    core.judge = lambda *a, **k: (core.CaseResult('x', True), None)\n"
            "    class R(core.Report):\n        passed = True\n    core.Report = R\n" + wrong
        ),
        ablate_head="failed",
    )
    add(
        "tamper_compare_in_default",
        with_ablate(
            "def ablate_head(z, head, _=__import__('interplab.grading.core').grading.core.__dict__.update(\n"
            "        _compare=lambda *a, **k: None, compare=lambda *a, **k: None)):\n" + wrong
        ),
        ablate_head="failed",
    )
    add(
        "tamper_expected_cache",
        with_ablate(
            "import sys\n"
            "def ablate_head(z, head):\n"
            "    reg = sys.modules['interplab.exercises'].__dict__['REG' + 'ISTRY']\n"
            "    for ex in reg.values():\n        ex.__dict__['_expected'] = None\n"
            "        ex.__dict__['compare'] = lambda e, g: None\n" + wrong
        ),
        ablate_head="failed",
    )
    add(
        "read_callers_frame",
        with_ablate(
            "import sys\n"
            "def ablate_head(z, head):\n"
            "    f = sys._getframe(1)\n"
            "    while f is not None:\n"
            "        for key in ('expected', 'exp', 'want'):\n"
            "            if key in f.f_locals and hasattr(f.f_locals[key], 'shape'):\n"
            "                return f.f_locals[key]\n"
            "        f = f.f_back\n" + wrong
        ),
        ablate_head="failed",
    )
    add(
        "tensor_subclass",
        with_ablate(
            "class Always(torch.Tensor):\n"
            "    @classmethod\n"
            "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
            "        return torch.tensor(True)\n"
            "def ablate_head(z, head):\n"
            "    return z.as_subclass(Always)\n"
        ),
        ablate_head="wrong_type",
    )
    add(
        "fake_class_proxy",
        with_ablate(
            "class Proxy:\n"
            "    __class__ = property(lambda self: torch.Tensor)\n"
            "    shape = property(lambda self: (0,))\n"
            "    def __eq__(self, other):\n        return True\n"
            "def ablate_head(z, head):\n"
            "    return Proxy()\n"
        ),
        ablate_head="wrong_type",
    )
    add(
        "forge_channel",
        with_ablate(
            "import os, sys, json, struct\n"
            "def ablate_head(z, head):\n"
            "    fd = int(sys.argv[sys.argv.index('--fd') + 1])\n"
            "    for rec in ({'event': 'case', 'name': 'ablate_head', 'i': 0, 'status': 'ok', 'passed': True},\n"
            "                {'exercise': 'ablate_head', 'status': 'passed', 'n_passed': 4, 'n_total': 4}):\n"
            "        text = json.dumps(rec).encode()\n"
            "        os.write(fd, b'IPL1' + struct.pack('>IQ', len(text), 0) + text)\n"
            "    os._exit(0)\n"
        ),
        ablate_head="crashed",
    )
    add(
        "forge_channel_from_cell",
        with_ablate(
            "import os, sys, json, struct\n"
            "fd = int(sys.argv[sys.argv.index('--fd') + 1])\n"
            "text = json.dumps({'event': 'cells', 'errors': []}).encode()\n"
            "os.write(fd, b'IPL1' + struct.pack('>IQ', len(text), 0) + text)\n"
            "def ablate_head(z, head):\n" + wrong
        ),
        ablate_head="error",
    )
    add(
        "flood_channel",
        with_ablate(
            "import os, sys, struct\n"
            "def ablate_head(z, head):\n"
            "    fd = int(sys.argv[sys.argv.index('--fd') + 1])\n"
            "    os.write(fd, b'IPL1' + struct.pack('>IQ', 10, 10**10) + b'x' * 1000)\n" + wrong
        ),
        ablate_head="crashed",
    )
    add(
        "flood_output",
        with_ablate(
            HONEST["ablate_head"].replace(
                "    return",
                "    import os\n    chunk = b'x' * (1 << 20)\n"
                "    for _ in range(64):\n        os.write(1, chunk)\n        os.write(2, chunk)\n"
                "    print('y' * 10**7)\n    return",
            )
        ),
        ablate_head="passed",
    )
    add(
        "touch_classmates_and_gradebook",
        with_ablate(
            HONEST["ablate_head"].replace(
                "    return",
                "    import os, pathlib\n"
                f"    for target in [{str(classmate)!r}, {str(gradebook)!r},\n"
                f"                   os.path.expanduser('~/.bashrc'), '/root/.bashrc',\n"
                f"                   {str(PACKAGE / 'grading' / 'compare.py')!r},\n"
                f"                   {str(PACKAGE / '__init__.py')!r}]:\n"
                "        try:\n"
                "            pathlib.Path(target).write_text('owned')\n"
                "        except OSError:\n            pass\n"
                "    return",
            )
        ),
        ablate_head="passed",
    )
    add(
        "write_package_then_wrong",
        with_ablate(
            "def ablate_head(z, head):\n"
            "    import interplab.grading.compare as c\n"
            "    try:\n"
            "        with open(c.__file__, 'a') as f:\n"
            "            f.write('\\ncompare = lambda *a, **k: None\\n')\n"
            "    except OSError:\n        pass\n" + wrong
        ),
        ablate_head="failed",
    )
    add(
        "processes_left_behind",
        with_ablate(
            HONEST["ablate_head"].replace(
                "    return",
                "    import os, subprocess, time\n"
                f"    subprocess.Popen(['sleep', '1000'], start_new_session=True,\n"
                f"                     env={{'MARK': {MARK!r}}}, stdout=subprocess.DEVNULL)\n"
                "    if os.fork() == 0:\n"
                "        os.setsid()\n"
                "        if os.fork() == 0:\n"
                f"            os.execvp('sleep', ['sleep', '1001', {MARK!r}])\n"
                "        os._exit(0)\n"
                "    time.sleep(0.2)\n"
                "    return",
            )
        ),
        ablate_head="passed",
    )
    add(
        "rewrite_gradebook_later",
        with_ablate(
            HONEST["ablate_head"].replace(
                "    return",
                "    import os, time\n"
                "    if os.fork() == 0:\n"
                "        os.setsid()\n"
                "        if os.fork() == 0:\n"
                "            time.sleep(3)\n"
                f"            open({str(gradebook)!r}, 'w').write('owned')\n"
                "        os._exit(0)\n"
                "    return",
            )
        ),
        ablate_head="passed",
    )
    add(
        "memory_bomb",
        with_ablate("def ablate_head(z, head):\n    hog = bytearray(64 << 30)\n    return z\n"),
        ablate_head="error",
    )
    add(
        "fork_bomb",
        with_ablate(
            "import os, time\n"
            "def ablate_head(z, head):\n"
            "    n = 0\n"
            "    try:\n"
            "        for _ in range(400):\n"
            "            if os.fork() == 0:\n"
            "                time.sleep(60)\n"
            "                os._exit(0)\n"
            "            n += 1\n"
            "    except OSError:\n"
            "        pass\n"
            "    return z * 0 + n\n"
        ),
        ablate_head="failed",
    )
    add(
        "endless_loop", with_ablate("def ablate_head(z, head):\n    while True:\n        pass\n"), ablate_head="timeout"
    )
    add("sleeps", with_ablate("import time\ndef ablate_head(z, head):\n    time.sleep(10**6)\n"), ablate_head="timeout")
    add("exit_in_cell", with_ablate(HONEST["ablate_head"], before_def="import os\nos._exit(3)\n"), ablate_head="error")
    add(
        "hang_in_cell",
        with_ablate(HONEST["ablate_head"], before_def="import time\ntime.sleep(10**6)\n"),
        ablate_head="error",
    )
    answer_key = get("ablate_head").reference.__module__  # interplab.solutions.<this chapter>
    add("borrow_import", with_ablate(f"from {answer_key} import ablate_head\n"), ablate_head="used_reference")
    add(
        "borrow_registry",
        with_ablate("def ablate_head(z, head):\n    return interplab.grading.reference('ablate_head')(z, head)\n"),
        ablate_head="used_reference",
    )
    hidden = " + ".join(repr(answer_key[i : i + 4]) for i in range(0, len(answer_key), 4))
    add(
        "borrow_hidden",
        with_ablate(
            "import importlib\n"
            "def ablate_head(z, head):\n"
            f"    mod = importlib.import_module({hidden})\n"
            "    return getattr(mod, 'ablate' + '_head')(z, head)\n"
        ),
        ablate_head="used_reference",
    )
    nb = notebook()  # a cell whose source list holds a number, and a cell that is not a cell at all
    nb["cells"].insert(1, {"cell_type": "code", "source": ["x = 1\n", 5], "metadata": {}, "outputs": []})
    nb["cells"].insert(2, 7)
    add("malformed_cells", nb)
    # nbformat 3, and the honest shapes
    add("honest", notebook())
    add("nbformat3", _to_v3(notebook()))
    add("shapes_a", _shapes_a())
    add("shapes_b", _shapes_b())
    return out


def _to_v3(nb: dict) -> dict:
    cells = []
    for c in nb["cells"]:
        c = {k: v for k, v in c.items() if k != "id"}
        if c["cell_type"] == "code":
            c["input"] = source(c).splitlines(True)
            c.pop("source")
            c["language"] = "python"
        cells.append(c)
    return {"nbformat": 3, "nbformat_minor": 0, "metadata": {"name": ""}, "worksheets": [{"cells": cells}]}


def _shapes_a() -> dict:
    """Constants, a lambda and a decorator from other cells; def inside if; %%time; %time in a body; a slow loop."""
    nb = notebook(
        {
            "per_token_loss": "def per_token_loss(logits, tokens):\n"
            "    logp = torch.log_softmax(logits[:, :-1], dim=VOCAB_DIM)\n"
            "    return -torch.gather(logp, VOCAB_DIM, shift(tokens).unsqueeze(-1)).squeeze(-1)",
            "answer_logit_diff": "if True:\n"
            "    def answer_logit_diff(logits, answer_ids, wrong_ids):\n"
            "        if answer_ids.shape != logits.shape[:1] or wrong_ids.shape != logits.shape[:1]:\n"
            "            raise ValueError('one id per prompt')\n"
            "        last = logits[:, LAST]\n"
            "        return last.gather(-1, answer_ids[:, None])[:, 0] - "
            "last.gather(-1, wrong_ids[:, None])[:, 0]",
            "previous_token_score": "@keeps_name\n"
            "def previous_token_score(pattern):\n"
            "    heads, n, _ = pattern.shape\n"
            "    if n < 2:\n"
            "        raise ValueError('no previous token')\n"
            "    out = torch.zeros(heads, dtype=pattern.dtype)\n"
            "    for h in range(heads):\n"
            "        total = 0.0\n"
            "        for q in range(1, n):\n"
            "            total = total + pattern[h, q, q - 1]\n"
            "        out[h] = total / (n - 1)\n"
            "    return out",
            "ablate_head": "%%time\n" + HONEST["ablate_head"],
            "head_ablation_loss": "def head_ablation_loss(model, tokens, layer, head, loss_mask=None):\n"
            "    %time n_tokens = tokens.numel()\n"
            "    def zero(z, hook):\n"
            "        return ablate_head(z, head)\n"
            "    logits = model.run_with_hooks(tokens, fwd_hooks=[(f'blocks.{layer}.attn.hook_z', zero)])\n"
            "    loss = per_token_loss(logits, tokens)\n"
            "    return (loss if loss_mask is None else loss[loss_mask[:, 1:]]).mean().item()",
        }
    )
    i = exercise_cell_index(nb, "per_token_loss")
    nb["cells"][i:i] = [
        code_cell(
            "VOCAB_DIM = -1\nLAST = -1\nshift = lambda t: t[:, 1:]\n"
            "1 / 0  # a cell that raises is recorded, and what it defined so far stays",
            "consts",
        ),
        code_cell(
            "import functools\n\ndef keeps_name(fn):\n    @functools.wraps(fn)\n"
            "    def wrapper(*args, **kwargs):\n        return fn(*args, **kwargs)\n"
            "    return wrapper",
            "decor",
        ),
    ]
    return nb


def _shapes_b() -> dict:
    """A class and helper functions in other cells; check() not called; names from the set-up cell."""
    nb = notebook(
        {
            "ablate_head": "def ablate_head(z, head):\n    return Zeroer(head)(z)",
            "per_token_loss": "def per_token_loss(logits, tokens):\n    return nll(logits[:, :-1], tokens[:, 1:])",
        },
        keep_check=False,
    )
    i = exercise_cell_index(nb, "per_token_loss")
    nb["cells"][i:i] = [
        code_cell(
            "class Zeroer:\n    def __init__(self, head):\n        self.head = head\n"
            "    def __call__(self, z):\n"
            "        if self.head not in range(z.shape[2]):\n            raise IndexError(self.head)\n"
            "        out = z.clone()\n"
            "        out[:, :, self.head] = 0\n        return out",
            "cls",
        ),
        code_cell(
            "def nll(logits, targets):\n    logp = logits.log_softmax(-1)\n"
            "    return -logp.gather(-1, targets[..., None])[..., 0]",
            "helper",
        ),
    ]
    return nb


# --- grading them -----------------------------------------------------------------------------------


def _hash_tree(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file() and "__pycache__" not in p.parts:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _marked_processes() -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                data = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if MARK.encode() in data:
                found.append(int(pid))
    return found


def _graded(tmp_path_factory, mode: str, names: set[str] | None):
    folder = tmp_path_factory.mktemp(f"class-{mode}")
    books = tmp_path_factory.mktemp(f"books-{mode}")
    others = {"classmate": folder / "00_zz_classmate.ipynb", "gradebook": books / "grades.csv"}
    chosen = {k: v for k, v in attacks(folder, others).items() if names is None or k in names}
    for fname, (nb, _) in chosen.items():
        (folder / fname).write_text(json.dumps(nb))
    (folder / "00_zz_classmate.ipynb").write_text(json.dumps(notebook()))
    (folder / "00_broken_json.ipynb").write_text('{"cells": [ {"cell_type": "code", "source": "x = 1"')
    os.mkfifo(folder / "00_fifo.ipynb")
    (folder / "00_a_folder.ipynb").mkdir()
    mystery = notebook()  # no chapter prefix, a malformed cell: graded on the exercises it defines
    mystery["cells"].insert(3, {"cell_type": "code", "source": [1, 2]})
    (folder / "mystery.ipynb").write_text(json.dumps(mystery))
    watched = [folder, PACKAGE] + [p for p in [Path.home() / ".bashrc"] if p.exists()]
    before = _hash_tree(watched)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    rows = grade([folder], out=others["gradebook"], limits=LIMITS, sandbox=mode, progress=False)
    seconds = time.time() - t0
    gradebook_text = others["gradebook"].read_text()
    time.sleep(4)  # give anything left behind the time to act
    return {
        "rows": rows,
        "chosen": chosen,
        "before": before,
        "after": _hash_tree(watched),
        "folder": folder,
        "gradebook": others["gradebook"],
        "gradebook_text": gradebook_text,
        "seconds": seconds,
        "rss_growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before,
        "left_behind": _marked_processes(),
    }


needs_bwrap = pytest.mark.skipif(not sandbox.bwrap_works(), reason="bubblewrap is not usable on this machine")


@pytest.fixture(scope="module")
def bwrapped(tmp_path_factory):
    if not sandbox.bwrap_works():
        pytest.skip("bubblewrap is not usable on this machine")
    return _graded(tmp_path_factory, "bwrap", None)


# Without a sandbox: what the limits and the process-tree killing must still guarantee.
FALLBACK = {
    "00_honest.ipynb",
    "00_forge_channel.ipynb",
    "00_flood_output.ipynb",
    "00_processes_left_behind.ipynb",
    "00_rewrite_gradebook_later.ipynb",
    "00_endless_loop.ipynb",
    "00_sleeps.ipynb",
    "00_memory_bomb.ipynb",
}


@pytest.fixture(scope="module")
def unsandboxed(tmp_path_factory):
    return _graded(tmp_path_factory, "none", FALLBACK)


def _rows_of(result, fname):
    return {r.exercise: r for r in result["rows"] if r.submission == fname}


def _check_notebook(result, fname):
    _, expected = result["chosen"][fname]
    rows = _rows_of(result, fname)
    got = {n: rows[n].status for n in EXERCISES}
    assert got == expected, (fname, {n: (rows[n].status, rows[n].message[:300]) for n in EXERCISES})
    for n in EXERCISES:
        r = rows[n]
        assert r.message.count("\n") < 40 and len(r.message) < 6000
        if expected[n] == "passed":
            assert r.score == 1.0
        else:
            assert r.score == 0.0 and r.n_passed == 0 or expected[n] in ("failed", "wrong_type"), r
    return rows


ATTACKS = sorted(attacks(Path("/x"), {"classmate": Path("/x/c"), "gradebook": Path("/x/g")}))


@pytest.mark.parametrize("fname", ATTACKS)
def test_bwrap_row(bwrapped, fname):
    rows = _check_notebook(bwrapped, fname)
    r = rows["ablate_head"]
    if "subclass" in fname:
        assert "subclass of torch.Tensor" in r.message
    if "proxy" in fname:
        assert "Proxy" in r.message
    if fname == "00_fork_bomb.ipynb":  # the number of forks that succeeded is the answer it returned
        got = int(float(re.search(r"got\s+\[([-\d.e+]+)", r.message).group(1)))
        assert got < LIMITS.nproc + 10
    if fname.startswith("00_borrow"):
        assert "reference" in r.message


@pytest.mark.parametrize("fname", sorted(FALLBACK))
def test_fallback_row(unsandboxed, fname):
    _check_notebook(unsandboxed, fname)


@pytest.mark.parametrize("which", ["bwrapped", "unsandboxed"])
def test_nothing_survives_and_the_gradebook_is_the_graders(request, which):
    result = request.getfixturevalue(which)
    assert result["left_behind"] == []
    assert result["gradebook"].read_text() == result["gradebook_text"] != "owned"
    assert result["rss_growth_kb"] < 400_000  # floods of output never reach the grader's memory


def test_bwrap_changes_no_file_outside_the_worker(bwrapped):
    changed = {
        p
        for p in set(bwrapped["before"]) | set(bwrapped["after"])
        if bwrapped["before"].get(p) != bwrapped["after"].get(p)
    }
    assert changed == set()


def test_broken_files_are_rows(bwrapped):
    rows = bwrapped["rows"]
    for fname, words in [
        ("00_broken_json.ipynb", "JSON"),
        ("00_fifo.ipynb", "named pipe"),
        ("00_a_folder.ipynb", "a folder"),
    ]:
        mine = [r for r in rows if r.submission == fname and r.exercise != "TOTAL"]
        assert mine and all(r.status == "unreadable" and words in r.message for r in mine), mine
    mystery = _rows_of(bwrapped, "mystery.ipynb")
    assert {k: v.status for k, v in mystery.items() if k != "TOTAL"} == ALL_PASS
    assert "skipped" in mystery["TOTAL"].message
    malformed = _rows_of(bwrapped, "00_malformed_cells.ipynb")["TOTAL"]
    assert "cell 2 skipped: its source is not text" in malformed.message
    assert "cell 3 skipped: it is not a notebook cell" in malformed.message
    shapes = _rows_of(bwrapped, "00_shapes_a.ipynb")["TOTAL"]
    assert "ZeroDivisionError" in shapes.message  # the raising cell is recorded, and tolerated
    assert "converted from nbformat 3" in _rows_of(bwrapped, "00_nbformat3.ipynb")["TOTAL"].message
    hung = _rows_of(bwrapped, "00_hang_in_cell.ipynb")["ablate_head"]
    assert "skipped" in hung.message and "no CPU time" in hung.message


def test_fallback_note_says_what_is_not_protected(capsys):
    sandbox._noted.clear()
    sandbox.note_once("none")
    sandbox.note_once("none")
    err = capsys.readouterr().err
    assert err.count("WITHOUT a sandbox") == 1 and "other submissions" in err and "apt-get install -y bubblewrap" in err


def test_limits_apply_without_a_sandbox(tmp_path):
    """The fallback's resource limits, seen from inside a worker-like child process."""
    import subprocess
    import sys

    code = (
        "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0], "
        "resource.getrlimit(resource.RLIMIT_FSIZE)[0], resource.getrlimit(resource.RLIMIT_NOFILE)[0], "
        "resource.getrlimit(resource.RLIMIT_CPU)[0])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=sandbox.limiter(3 << 30, 100, 1 << 20, 32, 256),
    )
    assert r.stdout.split() == [str(3 << 30), str(1 << 20), "256", "101"]


def test_fifo_is_refused_without_blocking(tmp_path):
    from interplab.grading.submission import Unreadable, read_bytes

    os.mkfifo(tmp_path / "x.ipynb")
    assert stat.S_ISFIFO(os.stat(tmp_path / "x.ipynb").st_mode)
    with pytest.raises(Unreadable, match="named pipe"):
        read_bytes(tmp_path / "x.ipynb")
