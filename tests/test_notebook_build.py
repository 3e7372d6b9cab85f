import ast
import json
import textwrap

import nbformat
import pytest

from mcvqa import notebook
from mcvqa.notebook import (
    FLOW_MODULES,
    NOTEBOOK_PATH,
    NotebookBuildError,
    build_notebook,
    duplicate_top_level_names,
    module_cells,
    module_sources,
    notebook_is_fresh,
    render_notebook,
)

FAKE_A = '''\
"""## Stage A

Defines the constants."""

import json

from .b import helper
from .c import (
    one,
    two,  # trailing comment inside the import
)

# A comment that must survive.
A_VALUE = 1  # and an inline one


def use_a():
    return json.dumps(A_VALUE)
'''

FAKE_B = '''\
"""## Stage B"""
import logging

from mcvqa.a import A_VALUE

logger = logging.getLogger("mcvqa")


def helper():
    return A_VALUE + 1
'''


def _write(folder, name, text):
    (folder / f"{name}.py").write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.fixture
def fake_pkg(tmp_path):
    _write(tmp_path, "a", FAKE_A)
    _write(tmp_path, "b", FAKE_B)
    return tmp_path


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _intra_package_imports(source):
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "mcvqa"):
            found.append(node.lineno)
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mcvqa" for a in node.names):
            found.append(node.lineno)
    return found


# --- builder logic, on fake modules ---------------------------------------------------------------


def test_module_cells_strip_docstring_and_intra_package_imports(fake_pkg):
    markdown, code = module_sources("a", fake_pkg)
    assert markdown == "## Stage A\n\nDefines the constants."
    assert code == (
        "import json\n\n"
        "# A comment that must survive.\n"
        "A_VALUE = 1  # and an inline one\n\n\n"
        "def use_a():\n"
        "    return json.dumps(A_VALUE)"
    )
    cells = module_cells("a", fake_pkg)
    assert [c.cell_type for c in cells] == ["markdown", "code"]
    assert cells[0].source == "### Stage A\n\nDefines the constants."  # one level below the builder's stage heading
    assert cells[1].source == "# mcvqa/a.py\n" + code  # the first line names the source file


def test_module_cut_into_cells_at_markers_with_call_cells(fake_pkg, monkeypatch):
    _write(fake_pkg, "c", '"""## C"""\nimport json\n\nX = 1\n\n\n# %% Second part\n\ndef f():\n    return X\n')
    monkeypatch.setattr(notebook, "CALL_CELLS", {"c": ("first", "print(X)"), "c: Second part": ("second", "f()")})
    cells = module_cells("c", fake_pkg)
    assert [(c.cell_type, c.source) for c in cells] == [
        ("markdown", "### C"), ("code", "# mcvqa/c.py\nimport json\n\nX = 1"),
        ("markdown", "**Run:** first"), ("code", "print(X)"),
        ("markdown", "#### Second part"), ("code", "# mcvqa/c.py (second part)\ndef f():\n    return X"),
        ("markdown", "**Run:** second"), ("code", "f()")]


def test_absolute_package_import_stripped(fake_pkg):
    _, code = module_sources("b", fake_pkg)
    assert "mcvqa" not in code.replace('getLogger("mcvqa")', "")
    assert code.startswith("import logging\n\nlogger = ")
    ast.parse(code)


@pytest.mark.parametrize(
    "body, message, line",
    [
        ("from . import b\n", "sibling module", 3),
        ("import mcvqa.b\n", "sibling module", 3),
        ("from mcvqa import b\n", "sibling module", 3),
        ("from __future__ import annotations\n", "__future__", 3),
        ("def f():\n    from .b import helper\n    return helper\n", "top level", 4),
        ("import os; from .b import helper\n", "shares a line", 3),
        ("if __name__ == '__main__':\n    pass\n", "__main__", 3),
    ],
)
def test_rejected_modules_name_file_and_line(fake_pkg, body, message, line):
    _write(fake_pkg, "bad", '"""## Bad"""\nimport json\n' + body)
    with pytest.raises(NotebookBuildError, match=message) as err:
        module_cells("bad", fake_pkg)
    assert f"bad.py:{line}:" in str(err.value)


def test_missing_docstring_rejected(fake_pkg):
    _write(fake_pkg, "nodoc", "import json\n")
    with pytest.raises(NotebookBuildError, match=r"nodoc\.py.*docstring"):
        module_cells("nodoc", fake_pkg)


def test_missing_module_rejected(fake_pkg):
    with pytest.raises(NotebookBuildError, match=r"missing\.py"):
        module_cells("missing", fake_pkg)


def test_build_layout_on_fakes(fake_pkg):
    nb = build_notebook(fake_pkg, ("a", "b"))
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# Kaggle All-in-One Pro")
    assert nb.cells[1].source == notebook.PARAMETERS_CELL
    assert nb.cells[1].metadata["tags"] == ["parameters"]
    assert nb.cells[2].source == "### Stage A\n\nDefines the constants."
    assert nb.cells[4].source == "### Stage B"
    assert [c.id for c in nb.cells] == [f"cell-{i:03d}" for i in range(len(nb.cells))]
    assert all(c.execution_count is None and c.outputs == [] for c in _code_cells(nb))
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["language_info"]["name"] == "python"
    nbformat.validate(nb)


def test_render_is_deterministic_and_ends_with_newline(fake_pkg):
    text = render_notebook(fake_pkg, ("a", "b"))
    assert text == render_notebook(fake_pkg, ("a", "b"))
    assert text.endswith("}\n")
    assert json.loads(text)["cells"][1]["metadata"]["tags"] == ["parameters"]


def test_freshness_check_catches_a_one_character_edit(fake_pkg, tmp_path):
    path = tmp_path / "nb.ipynb"
    path.write_text(render_notebook(fake_pkg, ("a", "b")), encoding="utf-8")
    assert notebook_is_fresh(path, fake_pkg, ("a", "b"))
    data = json.loads(path.read_text(encoding="utf-8"))
    code = next(c for c in data["cells"] if c["cell_type"] == "code" and "A_VALUE = 1" in "".join(c["source"]))
    code["source"] = [line.replace("A_VALUE = 1", "A_VALUE = 2") for line in code["source"]]
    path.write_text(nbformat.writes(nbformat.from_dict(data)) + "\n", encoding="utf-8")
    assert not notebook_is_fresh(path, fake_pkg, ("a", "b"))
    assert not notebook_is_fresh(tmp_path / "absent.ipynb", fake_pkg, ("a", "b"))


def test_main_check_and_write(fake_pkg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(notebook, "PACKAGE_DIR", fake_pkg)
    monkeypatch.setattr(notebook, "SETUP_MODULES", ())
    monkeypatch.setattr(notebook, "LAYOUT", (("Part I", (("Stages", ("a", "b")),)),))
    path = tmp_path / "nb.ipynb"
    assert notebook.main(["--check", "--path", str(path)]) == 1
    assert "notebook is stale: run python -m mcvqa.notebook" in capsys.readouterr().err
    assert notebook.main(["--path", str(path)]) == 0
    assert notebook.main(["--check", "--path", str(path)]) == 0


def test_duplicates_detected_on_fakes(fake_pkg):
    assert duplicate_top_level_names(fake_pkg, ("a", "b")) == {}
    _write(fake_pkg, "c", '"""## C"""\nimport logging\nlogger = logging.getLogger("mcvqa")\ntry:\n    A_VALUE = 3\nexcept ImportError:\n    pass\n\n\ndef helper():\n    pass\n')
    assert duplicate_top_level_names(fake_pkg, ("a", "b", "c")) == {"A_VALUE": ["a", "c"], "helper": ["b", "c"]}
    # `logger` is only exempt while every module defines it identically.
    _write(fake_pkg, "d", '"""## D"""\nimport logging\nlogger = logging.getLogger("other")\n')
    assert duplicate_top_level_names(fake_pkg, ("b", "d")) == {"logger": ["b", "d"]}


# --- the real package -----------------------------------------------------------------------------


def test_committed_notebook_is_fresh():
    assert NOTEBOOK_PATH.is_file(), "Kaggle_AllInOne_Pro.ipynb is missing: run python -m mcvqa.notebook"
    assert notebook_is_fresh(NOTEBOOK_PATH), "notebook is stale: run python -m mcvqa.notebook"


def test_real_code_cells_parse_and_have_no_package_imports():
    nb = build_notebook()
    code = _code_cells(nb)
    assert code[0].metadata.get("tags") == ["parameters"]
    assert code[0].source == notebook.PARAMETERS_CELL
    for i, cell in enumerate(code):
        ast.parse(cell.source, filename=f"code cell {i}")
        assert _intra_package_imports(cell.source) == [], f"code cell {i} imports from the package"


def test_real_notebook_follows_the_users_path():
    """Setup, then Part I's stages in the user's order with the config and hardware cells run right after
    their definitions, the engine room apart and marked as skippable, and the run's stage cells after it;
    no command-line-only module (DDP, sharding, snapshots) in it."""
    cells = build_notebook().cells
    headings = [c.source.splitlines()[0] for c in cells if c.cell_type == "markdown" and c.source.startswith("## ")]
    assert headings[0] == "## Setup" and headings[1] == "## 1. Configuration"
    assert [h.split(". ", 1)[0] for h in headings[1:]] == [f"## {k}" for k in range(1, len(headings))]
    parts = [c.source for c in cells if c.cell_type == "markdown" and c.source.startswith("# Part")]
    assert len(parts) == 3 and "safe to skip" in parts[1]
    code = [c.source for c in cells if c.cell_type == "code"]
    calls = [s.splitlines()[0] for s in code[1:] if not s.startswith("# mcvqa/")]
    assert calls == ["if MAKE_BUNDLE:  # a session with internet whose one job is the wheel dataset for the offline run",
                     "cfg = resolve_config(PROFILE, OVERRIDES)", "check_versions()", "run = start_run(cfg, hardware)",
                     "run_all_folds(run)", "metrics = finish_run(run)", 'analysis = pathlib.Path(run.cfg.output_dir, "analysis")']
    sources = [c.source.splitlines()[0] for c in cells if c.cell_type == "code" and c.source.startswith("# mcvqa/")]
    assert not [s for s in sources if "distributed" in s or "sharded" in s or "snapshot" in s]


def test_real_notebook_folds_the_engine_room_and_reaches_training_in_a_few_screens():
    """Every definition cell is folded for Jupyter and Kaggle except the few SHOWN_CELLS (what decides the answer, the
    training loop, the fork's image transform); call cells never are; a section says its title once; and the cell that
    starts training is a few screens down (183 screens before the re-layout)."""
    cells = build_notebook().cells
    definitions = [c for c in cells if c.cell_type == "code" and c.source.startswith("# mcvqa/")]
    calls = [c for c in cells if c.cell_type == "code" and not c.source.startswith("# mcvqa/")]
    assert all("jupyter" not in c.metadata and "_kg_hide-input" not in c.metadata for c in calls)
    shown = [c.source.splitlines()[0] for c in definitions if "jupyter" not in c.metadata]
    assert shown == ["# mcvqa/core/data.py (your image transform (edit this cell in a fork))",
                     "# mcvqa/core/scoring.py", "# mcvqa/core/training.py (the loop)"]
    for cell in definitions:
        if "jupyter" in cell.metadata:
            assert cell.metadata["jupyter"] == {"source_hidden": True} and cell.metadata["_kg_hide-input"] is True
    markdown = [c.source.splitlines()[0] for c in cells if c.cell_type == "markdown" and c.source]
    for stage, below in zip(markdown, markdown[1:]):
        if stage.startswith("## ") and below.startswith("### "):
            assert below[4:] != stage.split(". ", 1)[-1], f"title said twice: {stage!r}"
    measure = notebook.reading_measure()
    assert measure["screens_to_training"] <= 15, measure
    assert measure["shown_code_lines_above_training"] < 300, measure


def test_folded_notebook_runs_its_definitions_top_to_bottom():
    """Folding changes only metadata: the code cells, executed in order in one namespace, define everything without
    an error (Part III's calls aside; the papermill run in test_end_to_end runs them all)."""
    namespace = {}
    for cell in build_notebook().cells:
        if cell.cell_type == "code" and cell.source.startswith("# mcvqa/") and "bundle.py" not in cell.source[:30]:
            exec(compile(cell.source, cell.source.splitlines()[0], "exec"), namespace)
    assert callable(namespace["run_all_folds"]) and callable(namespace["custom_image_transform"])


def test_real_notebook_can_make_the_bundle_itself():
    """A Kaggle user has only the notebook: MAKE_BUNDLE in the parameters (off), the bundle's code in the setup
    section, and the setup call cell making the bundle instead of installing when it is on."""
    cells = build_notebook().cells
    namespace = {}
    exec(cells[1].source, namespace)  # the parameters cell
    assert namespace["MAKE_BUNDLE"] is False
    sources = [c.source for c in cells]
    setup, part_one = sources.index("## Setup"), next(i for i, s in enumerate(sources) if s.startswith("# Part I"))
    bundle = next(i for i, s in enumerate(sources) if s.startswith("# mcvqa/bundle.py"))
    assert setup < sources.index(next(s for s in sources if s.startswith("# mcvqa/machinery/packages.py"))) < bundle < part_one
    assert "def make_kernel_bundle(" in sources[bundle] and "def make_bundle(" in sources[bundle]
    call = next(s for s in sources[bundle + 1:part_one] if "ensure_packages()" in s).splitlines()
    assert call[0].startswith("if MAKE_BUNDLE:") and call[1].strip().startswith("make_kernel_bundle()")
    assert call[2].startswith("installed_now = ensure_packages()")


# What each part of the package may import (besides itself): the stages (core/) only the layer below and the model
# families; the wings (runkit/, speed/, scale/, toolkit/, demo/) the stages; only the top (pipeline, cli, ...) all.
ALLOWED_IMPORTS = {
    "machinery": set(),
    "families": {"machinery"},
    "core": {"machinery", "families"},
    "runkit": {"machinery", "families", "core"},
    "speed": {"machinery", "families", "core"},
    "scale": {"machinery", "families", "core"},
    "demo": {"machinery", "families", "core"},
    "toolkit": {"machinery", "families", "core", "runkit"},
}


def _package_imports():
    """{module: set of package modules it imports}, names relative to mcvqa (e.g. 'core.training')."""
    package = NOTEBOOK_PATH.parent / "mcvqa"
    graph = {}
    for path in sorted(package.rglob("*.py")):
        name = ".".join(path.relative_to(package).with_suffix("").parts)
        base = name.split(".")[:-1]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = base[:len(base) - (node.level - 1)] + ([node.module] if node.module else [])
                graph[name].add(".".join(parts))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mcvqa."):
                graph[name].add(node.module[len("mcvqa."):])
    return graph


def test_each_part_imports_only_the_parts_below_it():
    """The admission rule of the architecture: the stages (core/) never import a wing or the top; a wing never
    imports another wing (toolkit may read runkit's reports). Seen failing: core/training.py importing
    runkit/budget.py."""
    for module, imports in _package_imports().items():
        part = module.split(".")[0]
        if part not in ALLOWED_IMPORTS:
            continue  # the top: pipeline, cli, bundle, snapshot, notebook
        for target in imports:
            target_part = target.split(".")[0]
            assert target_part == part or target_part in ALLOWED_IMPORTS[part], f"{module} imports {target}"


def test_core_holds_only_the_stages_of_the_model_path():
    stages = {"config", "hardware", "memory", "modeling", "data", "prompts", "collate", "scoring", "training",
              "inference", "ensemble", "submission"}
    core = {p.stem for p in (NOTEBOOK_PATH.parent / "mcvqa" / "core").glob("*.py")} - {"__init__"}
    assert core == stages


def test_no_import_cycle_between_modules():
    graph = _package_imports()
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for target in graph.get(module, ()):
            if target in graph and target != module:
                visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_real_package_has_no_duplicate_top_level_names():
    assert duplicate_top_level_names() == {}


def test_real_module_cells_compile_together():
    source = "\n\n".join(module_sources(name)[1] for name in FLOW_MODULES)
    compile(source, "Kaggle_AllInOne_Pro.ipynb", "exec")
