"""Build `Kaggle_AllInOne_Pro.ipynb` from the package modules.

The notebook is the product's face: users run it top to bottom on Kaggle with nothing installed, so
it must carry every stage's code. It is generated, never hand-edited, in the order of `LAYOUT`: each
module becomes a markdown cell (its docstring) and code cells (the rest, minus the intra-package imports,
which a single flat notebook namespace makes unnecessary, cut at `# %% ` lines), each naming its source
file; short call cells (`CALL_CELLS`) run a stage right after its definitions. What only the command
line needs (DDP, sharded prediction, snapshots) is not in `LAYOUT` and stays out.

    python -m mcvqa.notebook           # write the notebook
    python -m mcvqa.notebook --check   # exit 1 when the committed notebook is stale

This module is the builder only; it is not part of the notebook.
"""

import argparse
import ast
import json
import pathlib
import sys

import nbformat

PACKAGE_NAME = "mcvqa"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
NOTEBOOK_PATH = PACKAGE_DIR.parent / "Kaggle_AllInOne_Pro.ipynb"

# The notebook in the user's order: (part heading, [(stage title, modules)]). Part I is the pipeline stage by
# stage, the configuration and hardware run right after their definitions; Part II the engine room (run machinery,
# run features, speed, scale, toolkit, demo builders), folded; Part III runs it, a call cell after each step with its
# result right under it. The engine room sits above the run because a notebook is one namespace run top to bottom:
# a function must be defined before the cell that calls it. Numbering is generated.
ENGINE_ROOM_PART = "Part II: the engine room (folded: definitions only, safe to skip)"
LAYOUT = (
    ("Part I: the pipeline, stage by stage", (
        ("Configuration", ("core.config",)),
        ("Hardware, versions and the memory plan", ("machinery.compat", "core.hardware", "core.memory")),
        ("Model: the checkpoint in 4 or 16 bits with LoRA adapters, per model family", (
            "core.modeling", "families.family", "families.qwen_vl", "families.qwen3_5", "families.gemma4",
            "families.registry")),
        ("Data: read and check the competition files", ("core.data",)),
        ("Dataset: the chat template, labels on the answer letter only", ("core.prompts", "core.collate")),
        ("Scoring: four letter logits at one position", ("core.scoring",)),
        ("Training: the explicit loop per fold", ("core.training",)),
        ("Inference: direct-logit scoring with option-order TTA", ("core.inference",)),
        ("Ensemble and submission", ("core.ensemble", "core.submission")),
    )),
    (ENGINE_ROOM_PART, (
        ("Run machinery: whole-or-nothing files, the process group", ("machinery.files", "machinery.process")),
        ("Run features: inputs, resume, what the run's end needs, the time budget", (
            "runkit.locate", "runkit.resume", "runkit.budget", "runkit.preflight")),
        ("Uncertainty gate and reports", ("runkit.gate", "runkit.reporting")),
        ("Speed: each image through the vision tower once, shared-prefix option orders, fast vision attention", (
            "speed.feature_cache", "speed.replay", "speed.shared_prefix", "speed.self_check", "speed.fast_vision")),
        ("Scale: one fold worker per GPU", ("scale.parallel",)),
        ("Error analysis and blending runs", ("toolkit.question_types", "toolkit.analysis", "toolkit.blend",
                                              "toolkit.run_blend")),
        ("Demo: tiny data and a tiny model for a CPU run", ("demo.demo_data", "demo.demo_model")),
    )),
    ("Part III: the run", (
        ("Run the pipeline", ("pipeline",)),
    )),
)
# Right after the parameters: nothing else may need a package. The bundle too: a notebook alone can make one.
SETUP_MODULES = ("machinery.errors", "machinery.packages", "bundle")
FLOW_MODULES = SETUP_MODULES + tuple(m for _, stages in LAYOUT for _, modules in stages for m in modules)
# The code a reader of Part I sees unfolded: what decides the answer (the letter logits, the loss) and the training
# loop. Every other definition cell is folded (its markdown stays visible): a click shows it, Run All runs it.
SHOWN_CELLS = frozenset({"core.data: Your image transform (edit this cell in a fork)", "core.scoring",
                         "core.training: The loop"})
# Part I modules whose docstrings are reference rather than the story (what differs per release or model family):
# like the engine room, only their title is markdown; the rest opens their folded code.
BRIEF_MODULES = frozenset({"machinery.compat", "families.family", "families.qwen_vl", "families.qwen3_5",
                           "families.gemma4", "families.registry"})
# Jupyter's and Kaggle's flags for a code cell whose source is collapsed (the cell still runs).
FOLDED = {"jupyter": {"source_hidden": True}, "_kg_hide-input": True}
SCREEN_LINES = 40  # rendered lines a laptop screen shows of a notebook, for the reading measure below
CELL_MARKER = "# %% "  # a module's code is cut into cells at these lines; the text is the next cell's heading

INTRO_MARKDOWN = """\
# Kaggle All-in-One Pro: Qwen-VL, Qwen3.5 and Gemma 4 LoRA / QLoRA for multiple-choice VQA

Fine-tunes a vision-language model with LoRA (16-bit) or 4-bit QLoRA, as the model family and the card allow, on a
multiple-choice VQA competition, over folds, and writes `submission.csv`. Everything is in the cells below; the setup
cell installs only what the image lacks. **Run All**: Part I defines the stages and runs the configuration and hardware
cells, Part II is the engine room (folded, safe to skip), Part III runs the data, one example prompt with its label,
training, and the submission, each result under its cell.

- **Kaggle** (2x T4, often no internet): attach the competition data and a Qwen2.5-VL, Qwen3-VL, Qwen3.5 or Gemma 4
  model (which one for which card: the README's model guide); both are found under `/kaggle/input`. Without
  internet also attach the wheel dataset, made once with internet by `MAKE_BUNDLE = True` (it says how to keep it).
- **Colab**: put the competition files in Drive's `MyDrive/mcvqa/data` and mount Drive; `PROFILE = "auto"` picks
  `colab_a100` on a GPU of 30 GiB or more, `colab_t4` below. **Local**: `PROFILE = "demo"` runs all of it on a CPU.

**Your changes, in a fork**
- **Settings** go in `OVERRIDES`, one `key=value` per line (`max_pixels=768*768`, `learning_rate=1e-4`): they win
  over the profile. Editing a default in the `Config` cell is not the place: the profile sets many of them (the
  config cell prints which, and where each value came from).
- **Code**: edit the cell its first line names (e.g. `# mcvqa/core/prompts.py`), then Run All. Your own image
  augmentation goes in `custom_image_transform` (Part I, Data; shown unfolded), switched on with
  `image_transform=custom` (`image_transform_on=train+test` to apply it at test time too): declared so, the feature
  cache steps aside. A re-run into a run folder whose folds were made by other prompt or image code or settings
  stops and says what changed (a new `output_dir` is the fix).
- Beyond one run: `blend_with=<earlier run folders>` blends runs at the end, `gate_fraction=0.1` gives the least
  certain rows all 24 option orders; a wrong setting stops with one message naming it and the fix.

This notebook is generated from the `mcvqa` package (`python -m mcvqa.notebook`), which is tested; in the package,
change the code there and regenerate."""

PARAMETERS_CELL = """\
# One flag switches the environment: "auto" picks kaggle_t4x2 on Kaggle, colab_a100 on Colab, demo on a CPU.
PROFILE = "auto"
# Your settings, one "key=value" per line, e.g. "epochs=2\\nmax_pixels=768*768"; they win over the profile.
OVERRIDES = \"\"
# True, with the internet on: only write the wheel dataset this notebook needs offline (peft, bitsandbytes, ...)
# to /kaggle/working/mcvqa_wheels, print how to keep it, and stop; nothing trains.
MAKE_BUNDLE = False"""

# Call cells: after a module's definitions (key "module") or after one of its marked cells ("module: heading").
CALL_CELLS = {
    "bundle": ("Check the packages, install only what is missing. Nothing below imports transformers, peft or "
               "bitsandbytes before this cell has run. With `MAKE_BUNDLE = True` it makes the wheel dataset instead "
               "and stops.",
               "if MAKE_BUNDLE:  # a session with internet whose one job is the wheel dataset for the offline run\n"
               "    make_kernel_bundle()  # to /kaggle/working/mcvqa_wheels; prints how to keep it; stops the run\n"
               "installed_now = ensure_packages()  # wheels: any folder of .whl files under /kaggle/input"),
    "core.config": ("The profile for this environment, your overrides on top, printed and kept.",
                    "cfg = resolve_config(PROFILE, OVERRIDES)"),
    "core.memory": ("The GPU, its precision and attention kernel, and why; the package versions.",
                    "check_versions()\nhardware = detect_hardware(cfg)"),
    "pipeline": ("Inputs found and checked, data read, the memory plan, the folds; then one training view as the "
                 "model sees it, with its label mask.",
                 "run = start_run(cfg, hardware)\nexample = show_example(run.train, run.processor, run.fmt, run.cfg)"),
    "pipeline: Each fold: load the model, train, predict the out-of-fold and test rows with TTA": (
        "Every fold: the 4-bit model with its trainable LoRA parameters, the training curve, the predictions. "
        "Safe to re-run after an interruption: finished folds are skipped, an unfinished one resumes.",
        "run_all_folds(run)"),
    "pipeline: After the folds: the ensemble, the submission, the report": [(
        "The fold ensemble, `submission.csv`, `metrics.json`; then the plots and the first rows of the submission.",
        "metrics = finish_run(run)\n"
        "from IPython.display import HTML, Image as ShowImage, Markdown, display\n"
        "for png in sorted(pathlib.Path(run.cfg.output_dir, \"plots\").glob(\"*.png\")):  # run.cfg: inputs found\n"
        "    display(ShowImage(filename=str(png)))\n"
        "pd.read_csv(metrics[\"submission\"]).head()"), (
        "What the model gets wrong (written by `finish_run` to `analysis/`): accuracy by question type, answer "
        "letter and confidence, the most confident out-of-fold mistakes, and the training rows whose label the "
        "model confidently disputes. With `blend_with` set, the blend's report: `submission.csv` is the blend.",
        "analysis = pathlib.Path(run.cfg.output_dir, \"analysis\")\n"
        "for name in (\"accuracy_by_type\", \"accuracy_by_answer\", \"accuracy_by_confidence\"):\n"
        "    display(ShowImage(filename=str(analysis / f\"{name}.png\")))\n"
        "display(HTML((analysis / \"gallery.html\").read_text(encoding=\"utf-8\")))  # all of it: analysis/analysis.html\n"
        "display(pd.read_csv(analysis / \"suspect_labels.csv\").head(10))\n"
        "if metrics.get(\"blend\"):\n"
        "    display(Markdown(pathlib.Path(metrics[\"blend\"][\"report\"]).read_text(encoding=\"utf-8\")))")],
}

# Names every module may define, provided all definitions are identical.
SHARED_NAMES = frozenset({"logger"})

STALE_MESSAGE = "notebook is stale: run python -m mcvqa.notebook"


class NotebookBuildError(ValueError):
    """A module cannot be turned into notebook cells as written."""


def _module_path(name, package_dir=None):
    return pathlib.Path(package_dir or PACKAGE_DIR) / f"{name.replace('.', '/')}.py"


def _read_module(name, package_dir=None):
    """Source text and parsed tree of module `name`."""
    path = _module_path(name, package_dir)
    if not path.is_file():
        raise NotebookBuildError(f"{path}: module {name!r} of FLOW_MODULES does not exist")
    source = path.read_text(encoding="utf-8")
    return path, source, ast.parse(source, filename=str(path))


def _is_intra_package(node):
    """Whether an import statement imports from this package (relative or absolute)."""
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        return node.level > 0 or module == PACKAGE_NAME or module.startswith(PACKAGE_NAME + ".")
    if isinstance(node, ast.Import):
        return any(a.name == PACKAGE_NAME or a.name.startswith(PACKAGE_NAME + ".") for a in node.names)
    return False


def _check_import(node, path):
    """Reject the imports that cannot work in one flat notebook namespace."""
    where = f"{path}:{node.lineno}"
    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
        # A __future__ import must open its cell, which a stitched module cell cannot guarantee.
        raise NotebookBuildError(f"{where}: 'from __future__' imports are not allowed in notebook modules")
    if not _is_intra_package(node):
        return
    if isinstance(node, ast.Import) or node.module in (None, PACKAGE_NAME):
        # The notebook has no module objects for siblings, only the names they define.
        raise NotebookBuildError(
            f"{where}: imports a sibling module as an object; use 'from .module import name' instead"
        )


def _check_nested_imports(tree, path):
    """Intra-package imports must be top-level statements: removing a nested one could empty a block."""
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_import(node, path)
            if _is_intra_package(node) and id(node) not in top_level:
                raise NotebookBuildError(
                    f"{path}:{node.lineno}: intra-package imports must be at module top level"
                )


def _is_main_guard(node):
    """`if __name__ == "__main__":` is true in a notebook, so such a block would run there."""
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _docstring_node(tree, path):
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        raise NotebookBuildError(f"{path}: module has no docstring (it becomes the cell's markdown)")
    return first


def _removed_line_ranges(tree, path):
    """1-based inclusive line ranges to drop: the docstring and the intra-package imports."""
    docstring = _docstring_node(tree, path)
    ranges = [(docstring.lineno, docstring.end_lineno)]
    for node in tree.body:
        if _is_main_guard(node):
            raise NotebookBuildError(
                f"{path}:{node.lineno}: an 'if __name__ == \"__main__\"' block would run in the notebook"
            )
        if _is_intra_package(node):
            ranges.append((node.lineno, node.end_lineno))
    _check_no_shared_lines(tree, ranges, path)
    return ranges


def _check_no_shared_lines(tree, ranges, path):
    """Removing whole lines is only safe when no kept statement shares them (e.g. `import os; from .x import y`)."""
    removed = {line for start, end in ranges for line in range(start, end + 1)}
    for node in tree.body:
        kept = not _is_intra_package(node) and node is not tree.body[0]
        if kept and {node.lineno, node.end_lineno} & removed:
            raise NotebookBuildError(
                f"{path}:{node.lineno}: statement shares a line with a removed import or docstring"
            )


def _strip_lines(source, ranges):
    """Drop the line ranges, plus the blank lines a removed block leaves doubled after a blank line."""
    lines = source.split("\n")
    drop = set()
    for start, end in ranges:
        drop.update(range(start - 1, end))
        follow = end
        # Everything between two top-level statements is outside any literal, so blanks are safe to drop.
        if start == 1 or not lines[start - 2].strip() or (start - 2) in drop:
            while follow < len(lines) and not lines[follow].strip():
                drop.add(follow)
                follow += 1
    kept = [line for i, line in enumerate(lines) if i not in drop]
    return "\n".join(kept).strip("\n")


def module_sources(name, package_dir=None):
    """(markdown, code) of module `name`: its docstring, and its code without docstring and intra-package imports."""
    path, source, tree = _read_module(name, package_dir)
    _check_nested_imports(tree, path)
    markdown = _docstring_node(tree, path).value.value.strip()
    return markdown, _strip_lines(source, _removed_line_ranges(tree, path))


def _relative_path(name):
    return f"{PACKAGE_NAME}/{name.replace('.', '/')}.py"


def _chunks(code):
    """[(heading or None, code)]: the module's code cut at its CELL_MARKER lines (the marker line itself goes)."""
    chunks, heading, lines = [], None, []
    for line in code.split("\n"):
        if line.startswith(CELL_MARKER):
            chunks.append((heading, "\n".join(lines).strip("\n")))
            heading, lines = line[len(CELL_MARKER):].strip(), []
        else:
            lines.append(line)
    chunks.append((heading, "\n".join(lines).strip("\n")))
    return chunks


def _demote(markdown, level="###"):
    """The docstring's title one heading level down (the builder's stage headings sit above it)."""
    first, _, rest = markdown.partition("\n")
    return f"{level} {first.lstrip('#').strip()}" + (f"\n{rest}" if rest else "")


def _call_cells(key):
    """The call cells after `key`: one (markdown, code) pair, or a list of them (a stage's result shown in steps)."""
    pairs = CALL_CELLS.get(key, [])
    cells = []
    for markdown, code in [pairs] if isinstance(pairs, tuple) else pairs:
        cells += [nbformat.v4.new_markdown_cell(f"**Run:** {markdown}"), nbformat.v4.new_code_cell(code)]
    return cells


def _fold(cell):
    cell.metadata.update(FOLDED)
    return cell


def _module_markdown(markdown, title_shown, engine_room):
    """A module's markdown: its docstring with the title one level down, without the title when the stage heading
    above says it already (a one-module stage), and only the title in the engine room (there the rest of the
    docstring opens the folded code)."""
    title, _, body = markdown.partition("\n")
    if engine_room:
        return _demote(title)
    return body.strip() if title_shown else _demote(markdown)


def _docstring_code(markdown):
    """The docstring's body as the string that opens a folded engine-room cell."""
    body = markdown.partition("\n")[2].strip().replace('"' * 3, "'" * 3)
    return f'\n"""{body}\n"""' if body else ""


def module_cells(name, package_dir=None, title_shown=False, engine_room=False):
    """The notebook cells of module `name`: its docstring as markdown, its code as one cell per marked part
    (each first line names the source file; folded unless SHOWN_CELLS names it), and the call cells that follow it.
    title_shown: the stage heading above has the module's title; engine_room: only the title as markdown."""
    markdown, code = module_sources(name, package_dir)
    text = _module_markdown(markdown, title_shown, engine_room)
    cells = [nbformat.v4.new_markdown_cell(text)] if text else []
    for i, (heading, chunk) in enumerate(_chunks(code)):
        if heading is not None:
            cells += [nbformat.v4.new_markdown_cell(f"#### {heading}")]
        source = f"# {_relative_path(name)}" + ("" if heading is None else f" ({heading.lower()})")
        if engine_room and i == 0:
            source += _docstring_code(markdown)
        key = name if heading is None else f"{name}: {heading}"
        cell = nbformat.v4.new_code_cell(f"{source}\n{chunk}")
        cells += [cell if key in SHOWN_CELLS else _fold(cell)]
        cells += _call_cells(key)
    return cells


def build_notebook(package_dir=None, modules=None):
    """The whole notebook: intro, parameters, setup, then LAYOUT's parts and stages (numbered here), each
    module's cells followed by its call cells. `modules` (tests): just those modules, in order, no headings."""
    parameters = nbformat.v4.new_code_cell(PARAMETERS_CELL)
    parameters.metadata["tags"] = ["parameters"]  # papermill injects its overrides after this cell
    cells = [nbformat.v4.new_markdown_cell(INTRO_MARKDOWN), parameters]
    if modules is not None:
        for name in modules:
            cells.extend(module_cells(name, package_dir))
    else:
        cells.append(nbformat.v4.new_markdown_cell("## Setup"))
        for name in SETUP_MODULES:
            cells.extend(module_cells(name, package_dir, engine_room=True))
        number = 0
        for part, stages in LAYOUT:
            cells.append(nbformat.v4.new_markdown_cell(f"# {part}"))
            for title, names in stages:
                number += 1
                cells.append(nbformat.v4.new_markdown_cell(f"## {number}. {title}"))
                for name in names:
                    cells.extend(module_cells(name, package_dir, title_shown=len(names) == 1,
                                              engine_room=part == ENGINE_ROOM_PART or name in BRIEF_MODULES))
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i:03d}"  # nbformat makes random ids; fixed ones keep the diff stable
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.nbformat, nb.nbformat_minor = 4, 5  # pin, so a newer nbformat does not change the file
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def render_notebook(package_dir=None, modules=None):
    """The exact text of the committed notebook."""
    text = nbformat.writes(build_notebook(package_dir, modules))
    return text if text.endswith("\n") else text + "\n"


def notebook_is_fresh(path=None, package_dir=None, modules=None):
    """Whether the notebook file at `path` equals a fresh render."""
    path = pathlib.Path(path or NOTEBOOK_PATH)
    if not path.is_file():
        return False
    return path.read_bytes().decode("utf-8") == render_notebook(package_dir, modules)


TRAINING_CALL = "run_all_folds(run)"


def _folded(cell):
    return cell.cell_type == "code" and cell.metadata.get("jupyter", {}).get("source_hidden", False)


def _rendered_lines(cell):
    """Lines a cell takes on screen, with the gap to the next: a folded code cell shows one line (its ellipsis)."""
    if _folded(cell):
        return 2
    return len(cell.source.splitlines()) + 1


def _code_lines(cells):
    return sum(len(c.source.splitlines()) for c in cells if c.cell_type == "code")


def reading_measure(nb=None):
    """How far a reader scrolls: code lines in all, code lines and screens (SCREEN_LINES rendered lines; outputs not
    counted) above the cell that starts training, and how many of those code lines are folded."""
    nb = nb or build_notebook()
    training = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and TRAINING_CALL in c.source)
    above = nb.cells[:training]
    folded = [c for c in above if _folded(c)]
    return {"cells": len(nb.cells), "code_lines": _code_lines(nb.cells), "code_lines_above_training": _code_lines(above),
            "shown_code_lines_above_training": _code_lines(above) - _code_lines(folded),
            "screens_to_training": round(sum(_rendered_lines(c) for c in above) / SCREEN_LINES, 1)}


def _defined_names(tree):
    """Top-level names a module defines (functions, classes, assigned globals), with each definition's AST dump."""
    defined = {}
    stack = list(tree.body)
    while stack:
        node = stack.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined[node.name] = ast.dump(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        defined[sub.id] = ast.dump(node.value)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            # Definitions under a top-level if/try/with still land in the shared namespace.
            stack.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)
    return defined


def duplicate_top_level_names(package_dir=None, modules=None):
    """Names defined at top level by more than one module -> those modules (a duplicate silently overwrites)."""
    modules = FLOW_MODULES if modules is None else modules
    owners = {}
    for name in modules:
        _, _, tree = _read_module(name, package_dir)
        for defined, dump in _defined_names(tree).items():
            owners.setdefault(defined, []).append((name, dump))
    duplicates = {}
    for defined, found in sorted(owners.items()):
        if len(found) < 2:
            continue
        if defined in SHARED_NAMES and len({dump for _, dump in found}) == 1:
            continue
        duplicates[defined] = [name for name, _ in found]
    return duplicates


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mcvqa.notebook", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed notebook is stale")
    parser.add_argument("--path", type=pathlib.Path, default=None, help="notebook path (default: repo root)")
    parser.add_argument("--measure", action="store_true", help="print how far a reader scrolls to training")
    args = parser.parse_args(argv)
    path = args.path or NOTEBOOK_PATH
    try:
        if args.measure:
            print(json.dumps(reading_measure(), indent=1))
            return 0
        if args.check:
            if notebook_is_fresh(path):
                print(f"{path.name} is up to date")
                return 0
            print(STALE_MESSAGE, file=sys.stderr)
            return 1
        text = render_notebook()
    except NotebookBuildError as err:
        print(f"cannot build the notebook: {err}", file=sys.stderr)
        return 2
    path.write_bytes(text.encode("utf-8"))  # bytes: no platform newline translation
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
