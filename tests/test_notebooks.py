"""Every chapter notebook: committed without outputs, executes as shipped, and passes every check
with the reference solutions injected."""

import os
from pathlib import Path

import pytest

from interplab.grading.notebooks import SETUP_MARKER, has_outputs, inject_solutions, read_notebook, setup_cell_source

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((REPO / "chapters").glob("*.ipynb"))
IDS = [p.stem for p in CHAPTERS]


def test_chapters_exist():
    assert CHAPTERS and CHAPTERS[0].name == "00_orientation.ipynb"


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_committed_without_outputs(path):
    assert not has_outputs(read_notebook(path)), f"{path.name} has outputs; clear them before committing"


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 requires cell ids; a cell added by hand without one draws a warning today and
    will be an error in future nbformat versions."""
    nb = read_notebook(path)
    ids = [c.get("id") for c in nb["cells"]]
    if (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5):
        missing = [i for i, cell_id in enumerate(ids) if not cell_id]
        assert not missing, f"{path.name}: cells {missing} have no id; give each a unique 8-hex-digit id"
        assert len(set(ids)) == len(ids), f"{path.name}: cell ids repeat"


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_first_cell_is_the_colab_setup_cell(path):
    first = next(c for c in read_notebook(path)["cells"] if c["cell_type"] == "code")
    src = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
    assert src.startswith(SETUP_MARKER) and src == setup_cell_source(), (
        f"{path.name}: run `python -m interplab.grading.notebooks --sync`"
    )


@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_colab_badge_points_at_this_notebook(path):
    cells = read_notebook(path)["cells"]
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert f"/blob/main/chapters/{path.name}" in text


def _execute(nb, tmp_path, strict):
    from nbclient import NotebookClient

    old = os.environ.get("INTERPLAB_STRICT")
    os.environ["INTERPLAB_STRICT"] = "1" if strict else "0"
    try:
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        if old is None:
            os.environ.pop("INTERPLAB_STRICT", None)
        else:
            os.environ["INTERPLAB_STRICT"] = old
    return "\n".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )


SILENT_LIMIT_S = 30.0  # a cell may run this long (wall time) without progress output: 20 s on 2 idle cores + slack


def _seconds(cell) -> float | None:
    """How long a cell ran, from the timestamps nbclient records in its metadata."""
    from datetime import datetime

    t = cell.get("metadata", {}).get("execution", {})
    start, end = t.get("iopub.execute_input") or t.get("shell.execute_request"), t.get("shell.execute_reply")
    if not start or not end:
        return None
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def _shows_progress(cell) -> bool:
    """A progress bar (tqdm text on stderr, or a widget) or lines printed as the work goes."""
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") == "stderr" and ("%|" in o.get("text", "")):
            return True
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {}):
            return True
        if o.get("output_type") == "stream" and o.get("text", "").count("\n") >= 3:
            return True
    return False


def _assert_long_cells_talk(nb):
    """No cell runs long in silence, and no output carries a tqdm warning."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        texts = [o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"]
        if any("TqdmWarning" in t or "TqdmExperimentalWarning" in t for t in texts):
            problems.append(f"cell {i} prints a tqdm warning")
        secs = _seconds(cell)
        if secs is not None and secs > SILENT_LIMIT_S and not _shows_progress(cell):
            first = "".join(cell.source).strip().splitlines()[:1]
            problems.append(f"cell {i} ran {secs:.0f} s without progress output ({first})")
    assert not problems, "; ".join(problems)


def _n_checks(nb):
    return sum(("= check(" in "".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_executes_as_shipped(path, tmp_path):
    """Stubs fail their checks and fall back to the reference; the chapter still runs to the end."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    out = _execute(nb, tmp_path, strict=False)
    assert out.count("uses the reference solution") == _n_checks(nb)
    _assert_long_cells_talk(nb)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_executes_with_solutions_injected(path, tmp_path):
    """With the reference solutions pasted in, every check passes (strict: a failure stops the run)."""
    import nbformat

    nb = nbformat.from_dict(inject_solutions(read_notebook(path)))
    out = _execute(nb, tmp_path, strict=True)
    assert out.count("checks passed") == _n_checks(nb) > 0
    assert "uses the reference solution" not in out
