"""Every chapter notebook: committed without outputs, executes as shipped, and passes every check
with the reference solutions injected."""

import json
import os
from pathlib import Path

import pytest

from interplab.grading.notebooks import (
    SETUP_MARKER,
    cell_source,
    has_outputs,
    inject_solutions,
    read_notebook,
    setup_cell_source,
    sync_setup_cells,
)

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


# A cell may use this much CPU time in silence: "over 20 s on 2 idle cores" measured as CPU time
# (the kernel's threads and children), which a loaded machine does not inflate as it does wall time.
SILENT_CPU_S = 20.0
METER = "__interplab_cell_cpu__"

_METER_START = f"""
import json as _json, resource as _resource
{METER} = []
def _cpu_now():
    return sum(getattr(_resource.getrusage(w), f) for w in (_resource.RUSAGE_SELF, _resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
def _meter_pre(info):
    {METER}.append([info.raw_cell, _cpu_now()])
def _meter_post(result):
    {METER}[-1][1] = _cpu_now() - {METER}[-1][1]
get_ipython().events.register("pre_run_cell", _meter_pre)
get_ipython().events.register("post_run_cell", _meter_post)
"""
_METER_END = f"print('{METER}' + _json.dumps({METER}[1:-1]))"


def _add_cpu_meter(nb) -> None:
    """Wrap a notebook with two cells that record each cell's CPU time in the kernel."""
    import nbformat

    nb.cells.insert(0, nbformat.v4.new_code_cell(_METER_START))
    nb.cells.append(nbformat.v4.new_code_cell(_METER_END))


def _read_cpu_meter(nb) -> dict[str, float]:
    """Remove the meter's cells again; the CPU seconds of each executed cell, by its source."""
    end, start = nb.cells.pop(), nb.cells.pop(0)
    assert start.source == _METER_START
    text = "".join(o.get("text", "") for o in end.get("outputs", []) if o.get("output_type") == "stream")
    assert METER in text, "the CPU meter printed nothing"
    cpu: dict[str, float] = {}
    for source, seconds in json.loads(text.split(METER, 1)[1]):
        cpu[source] = max(cpu.get(source, 0.0), float(seconds))
    return cpu


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


def _assert_long_cells_talk(nb, cpu: dict[str, float]):
    """No cell runs long in silence, and no output carries a tqdm warning."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        texts = [o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"]
        if any("TqdmWarning" in t or "TqdmExperimentalWarning" in t for t in texts):
            problems.append(f"cell {i} prints a tqdm warning")
        secs = cpu.get(cell.source)
        if secs is not None and secs > SILENT_CPU_S and not _shows_progress(cell):
            first = cell.source.strip().splitlines()[:1]
            problems.append(f"cell {i} used {secs:.0f} s of CPU without progress output ({first})")
    assert not problems, "; ".join(problems)


def _n_checks(nb):
    return sum(("= check(" in "".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_executes_as_shipped(path, tmp_path):
    """Stubs fail their checks and fall back to the reference; the chapter still runs to the end."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    _add_cpu_meter(nb)
    out = _execute(nb, tmp_path, strict=False)
    cpu = _read_cpu_meter(nb)
    assert out.count("uses the reference solution") == _n_checks(nb)
    _assert_long_cells_talk(nb, cpu)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", CHAPTERS, ids=IDS)
def test_executes_with_solutions_injected(path, tmp_path):
    """With the reference solutions pasted in, every check passes (strict: a failure stops the run)."""
    import nbformat

    nb = nbformat.from_dict(inject_solutions(read_notebook(path)))
    out = _execute(nb, tmp_path, strict=True)
    assert out.count("checks passed") == _n_checks(nb) > 0
    assert "uses the reference solution" not in out


def test_syncing_the_setup_cells_rewrites_only_what_changed(tmp_path):
    for path in CHAPTERS[:2]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    first = tmp_path / CHAPTERS[0].name
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.ipynb")}
    assert sync_setup_cells(tmp_path) == []
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.ipynb")} == before  # byte for byte

    nb = json.loads(first.read_text())
    cell = next(c for c in nb["cells"] if cell_source(c).startswith(SETUP_MARKER))
    cell["source"] = SETUP_MARKER + "\n# an old set-up cell\n"
    first.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    assert sync_setup_cells(tmp_path) == [first]
    synced = next(c for c in json.loads(first.read_text())["cells"] if cell_source(c).startswith(SETUP_MARKER))
    assert isinstance(synced["source"], list) and "an old set-up cell" not in cell_source(synced)
    assert (tmp_path / CHAPTERS[1].name).read_bytes() == before[CHAPTERS[1].name]
