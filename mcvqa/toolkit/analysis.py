"""## Error analysis of a finished run: confident mistakes, accuracy by group, possible label noise

    python -m mcvqa analyze runs/a [--out DIR] [--data-dir DIR] [--top 24]

Reads the run's `oof_probs.csv` (out-of-fold probabilities of the train rows) and the question,
options and image of each row from `train.csv` of its data folder (config.json's `data_dir`, or
`--data-dir`), and writes into `<run>/analysis/` (or `--out`, for a read-only run folder):

- `wrong_gallery.png` and `analysis.html`: the `top_n` most confident wrong out-of-fold predictions
  (highest probability on a wrong option first) with thumbnail, question, options, probabilities and
  label. The HTML page embeds small thumbnails (base64), so it stands alone when copied. The PNG draws
  the Korean text with a font with Hangul glyphs (hangul_font: matplotlib's font cache, else the font
  files on disk, so `apt-get install fonts-nanum` counts from the next analysis on); without one it
  shows ids, letters and probabilities only (no boxes for Hangul), and the pages say how to get one.
- `accuracy_by_type.png`, `accuracy_by_answer.png`, `accuracy_by_confidence.png`: bar charts with the
  row counts; question types come from question_types.question_type (the blend's --per-type uses it too).
- `suspect_labels.csv`: train rows whose label the model disputes with confidence (out-of-fold
  probability of the label below `suspect_label_max` and of another option above `suspect_other_min`),
  possible label noise to look at by hand.
- `gallery.html`: the gallery's table alone (what the notebook shows under its last cells).
- `analysis.json`: all of the above as numbers and ids.

Every run ends with `analyze_run(out_dir, cfg.data_dir)` (pipeline.finish_run, after its plots).
"""

import base64
import html
import io
import json
import os
import pathlib
import warnings

import numpy as np
import pandas as pd
from matplotlib import font_manager, ft2font
from matplotlib.figure import Figure  # (no pyplot: figures render with Agg, the session's backend stays as it is)
from matplotlib.textpath import text_to_path

from ..core.data import OPTION_LETTERS, PROB_COLUMNS, letter_indices, letters_from_probs, read_competition_csv
from ..machinery.errors import UserError
from ..machinery.files import read_json
from ..runkit.gate import margin
from .question_types import QUESTION_TYPES, question_type

TOP_N = 24
SUSPECT_LABEL_MAX = 0.1
SUSPECT_OTHER_MIN = 0.8
CONFIDENCE_EDGES = (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)  # top probability of four options lies in [0.25, 1]
THUMB_PX = 128
# Fonts with Hangul glyphs matplotlib may find (Linux, Windows, macOS, Colab's apt fonts-nanum).
HANGUL_FONTS = ("NanumGothic", "NanumBarunGothic", "Noto Sans CJK KR", "Noto Sans KR", "Noto Sans CJK JP",
                "Malgun Gothic", "AppleGothic", "Apple SD Gothic Neo", "UnDotum", "Baekmuk Gulim", "Source Han Sans KR")
# How their files begin (lower case, no separators): NanumGothic.ttf, NotoSansCJK-Regular.ttc, malgun.ttf, gulim.ttf ...
HANGUL_FONT_FILES = ("nanumgothic", "nanumbarungothic", "notosanscjk", "notosanskr", "sourcehansans", "malgun",
                     "applegothic", "applesdgothicneo", "undotum", "gulim")
FONT_HINT = ("No font with Hangul glyphs was found, so the PNG gallery shows ids, letters and probabilities only (the "
             "questions and options are in the table). To draw them in it as well: <code>apt-get install -y "
             "fonts-nanum</code> (Colab; Kaggle with internet on), then run the analysis again (the next run, or "
             "<code>python -m mcvqa analyze &lt;run folder&gt;</code>): the font is found by its file, no restart.")
GALLERY_COLS = 4
GALLERY_PT, GALLERY_DPI = 9, 100  # 12.5 px a line: smaller Hangul blurs into blots
GALLERY_CELL_W, GALLERY_IMAGE_H, GALLERY_PAD = 3.6, 2.0, 0.15  # inches
GALLERY_LINE_H = 1.5 * GALLERY_PT / 72  # inches: Hangul fills the em, so lines need more than matplotlib's 1.2
QUESTION_LINES = 3


class AnalysisError(UserError, ValueError):
    """The run folder or its data folder lacks what the analysis reads, or cannot be written."""


def _has_hangul(path):
    try:
        charmap = ft2font.FT2Font(path).get_charmap()
    except (OSError, RuntimeError, ValueError):  # (not a font FreeType reads)
        return False
    return all(ord(glyph) in charmap for glyph in "가힣")


def hangul_font():
    """The family name of a font with Hangul glyphs, or None. matplotlib's font cache (fontManager, built once and
    kept on disk) misses fonts installed after it was built, e.g. Colab's `apt-get install fonts-nanum`: so the font
    folders are searched by file name too, and a font found there joins fontManager (the figures find it by name)."""
    cached = {font.name for font in font_manager.fontManager.ttflist if os.path.exists(font.fname)}
    name = next((name for name in HANGUL_FONTS if name in cached), None)
    if name:
        return name
    for path in sorted(font_manager.findSystemFonts()):  # (walks the font folders: what is on disk now)
        stem = pathlib.Path(path).stem.lower().replace("-", "").replace("_", "").replace(" ", "")
        if stem.startswith(HANGUL_FONT_FILES) and _has_hangul(path):  # (a name alone could draw boxes)
            font_manager.fontManager.addfont(path)
            return font_manager.FontProperties(fname=path).get_name()
    return None


# --- the numbers --------------------------------------------------------------------------------------

def _group_accuracy(keys, correct, order):
    """[{key, n, correct, accuracy}] per key in order (keys with no rows: n 0, accuracy None)."""
    keys, correct = np.asarray(keys), np.asarray(correct, dtype=bool)
    rows = []
    for key in order:
        hit = keys == key
        n = int(hit.sum())
        rows.append({"key": key, "n": n, "correct": int(correct[hit].sum()),
                     "accuracy": float(correct[hit].mean()) if n else None})
    return rows


def confidence_bins(confidence, correct, edges=CONFIDENCE_EDGES):
    """Accuracy per bin of top probability: [lo, hi) bins, the last one closed; rows below edges[0] go to the first."""
    confidence = np.asarray(confidence, dtype=float)
    index = np.clip(np.searchsorted(np.asarray(edges[1:-1]), confidence, side="right"), 0, len(edges) - 2)
    rows = _group_accuracy(index, correct, range(len(edges) - 1))
    for row, lo, hi in zip(rows, edges[:-1], edges[1:]):
        hit = index == row["key"]
        row.update(key=f"[{lo:.2f}, {hi:.2f}{']' if hi == edges[-1] else ')'}", low=lo, high=hi,
                   mean_confidence=float(confidence[hit].mean()) if hit.any() else None)
    return rows


def hard_row_ids(run_dir, max_margin):
    """Ids of an earlier run's out-of-fold rows it got wrong, or nearly (top-2 probability margin below
    `max_margin`)."""
    oof_path = pathlib.Path(run_dir) / "oof_probs.csv"
    if not oof_path.exists():
        raise AnalysisError(f"hard_rows_from={run_dir}: no oof_probs.csv there. Fix: the output_dir of a finished "
                            "`python -m mcvqa run` on the same train.csv")
    oof = pd.read_csv(oof_path, dtype={"id": str})
    probs = oof[list(PROB_COLUMNS)].to_numpy()
    wrong = np.asarray(letters_from_probs(probs)) != oof["answer"].to_numpy()
    return set(oof["id"][wrong | (margin(probs) < max_margin)])


def oof_table(run_dir, data_dir=None):
    """The run's out-of-fold rows joined with train.csv: id, probs, fold, answer, pred, confidence, correct,
    question, a-d, image_path, type."""
    run_dir = pathlib.Path(run_dir)
    oof_path = run_dir / "oof_probs.csv"
    if not oof_path.exists():
        raise AnalysisError(f"{oof_path}: not found, so {run_dir} is not a finished run folder. "
                            "Fix: pass the output_dir of a finished `python -m mcvqa run` (or of a blend)")
    oof = pd.read_csv(oof_path, dtype={"id": str})
    missing = [c for c in ("id", *PROB_COLUMNS, "answer") if c not in oof.columns]
    if missing:
        raise AnalysisError(f"{oof_path}: missing columns {', '.join(missing)}. Fix: re-run the run")
    if data_dir is None:
        config_path = run_dir / "config.json"
        value = read_json(config_path).get("data_dir")
        if not value:
            raise AnalysisError(f"{config_path}: no data_dir to read train.csv from. Fix: --data-dir <data folder>")
        data_dir, source = pathlib.Path(value), f"data_dir in {config_path}"
    else:
        data_dir, source = pathlib.Path(data_dir), "--data-dir"
    train_path = data_dir / "train.csv"
    if not train_path.exists():
        raise AnalysisError(f"{train_path}: not found ({source}). "
                            "Fix: --data-dir <the folder with the run's train.csv>")
    train = read_competition_csv(train_path, "train").drop(columns="answer").set_index("id")
    unknown = [i for i in oof["id"] if i not in train.index]
    if unknown:
        raise AnalysisError(f"{train_path}: {len(unknown)} out-of-fold ids of {run_dir} are not in it "
                            f"(e.g. {unknown[:3]}). Fix: --data-dir <the data folder this run was trained on>")
    table = oof.join(train, on="id")
    probs = table[PROB_COLUMNS].to_numpy(dtype=float)
    table["answer"] = table["answer"].astype(str).str.strip().str.lower()
    table["pred"] = letters_from_probs(probs)
    table["confidence"] = probs.max(1)
    table["correct"] = table["pred"] == table["answer"]
    table["type"] = [question_type(q) for q in table["question"]]
    return table


def confident_wrong(table, top_n=TOP_N):
    """The top_n wrong rows with the highest top probability (ties: by id)."""
    wrong = table[~table["correct"]]
    return wrong.sort_values(["confidence", "id"], ascending=[False, True], kind="stable").head(top_n)


def zero_shot_disputes(run_dir, table):
    """Per table row: whether the base model (the folds' zero_shot_oof_probs.csv, zero_shot_label_check) ranks two
    or more options above the label, i.e. the label is outside its top 2; None when the run has no such files."""
    files = sorted(pathlib.Path(run_dir).glob("fold*/zero_shot_oof_probs.csv"))
    if not files:
        return None
    base = pd.concat([pd.read_csv(f, dtype={"id": str}) for f in files]).drop_duplicates("id").set_index("id")
    probs = base.reindex(table["id"].astype(str))[PROB_COLUMNS].to_numpy(dtype=float)
    label = letter_indices(table["answer"])
    above = (probs > probs[np.arange(len(table)), label][:, None]).sum(1)
    return (above >= 2) & ~np.isnan(probs).any(1)


def suspect_labels(table, label_max=SUSPECT_LABEL_MAX, other_min=SUSPECT_OTHER_MIN, base_disputes=None):
    """Rows whose label gets below label_max while another option gets above other_min, and (base_disputes,
    zero_shot_disputes) the rows whose label the base model ranks outside its top 2 (most disputed first)."""
    probs = table[PROB_COLUMNS].to_numpy(dtype=float)
    label = letter_indices(table["answer"])
    p_label = probs[np.arange(len(table)), label]
    others = probs.copy()
    others[np.arange(len(table)), label] = -1.0
    rival = others.argmax(1)
    p_rival = others.max(1)
    keep = (p_label < label_max) & (p_rival > other_min)
    base = np.zeros(len(table), bool) if base_disputes is None else np.asarray(base_disputes, bool)
    keep = keep | base
    suspects = pd.DataFrame({"id": table["id"], "answer": table["answer"], "p_answer": p_label,
                             "base_model_disputes": base,
                             "model_says": [OPTION_LETTERS[i] for i in rival], "p_model": p_rival,
                             "fold": table["fold"] if "fold" in table else None,
                             "type": table["type"], "question": table["question"],
                             **{letter: table[letter] for letter in OPTION_LETTERS},
                             "image_path": table["image_path"]})[keep]
    return suspects.sort_values(["p_model", "id"], ascending=[False, True], kind="stable").reset_index(drop=True)


# --- the pictures -------------------------------------------------------------------------------------

def _thumbnail(path, size=THUMB_PX):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return image
    except (OSError, ValueError):  # a missing or broken image: a grey square, the row is still listed
        return Image.new("RGB", (size, size), (200, 200, 200))


def _thumbnail_base64(path):
    buffer = io.BytesIO()
    _thumbnail(path, 96).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _bar_chart(rows, title, xlabel, out_path):
    fig = Figure(figsize=(max(4.0, 1.1 * len(rows)), 3.6))
    ax = fig.subplots()
    accuracies = [row["accuracy"] or 0.0 for row in rows]
    bars = ax.bar([str(row["key"]) for row in rows], accuracies, color="#4c72b0")
    for bar, row in zip(bars, rows):
        label = f"{row['accuracy']:.2f}\nn={row['n']}" if row["n"] else "n=0"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set(title=title, xlabel=xlabel, ylabel="out-of-fold accuracy", ylim=(0, 1.2))
    ax.tick_params(axis="x", labelsize=8)
    fig.savefig(out_path, dpi=100, bbox_inches="tight")
    return out_path


def _fit(text, prop, width_pt, max_lines):
    """text in at most max_lines lines no wider than width_pt in prop's font, broken at the last space that fits
    (else inside the word: Korean may break anywhere); text left over cuts the last line with '...'."""
    def fits(line):
        return text_to_path.get_text_width_height_descent(line, prop, ismath=False)[0] <= width_pt

    lines, rest = [], " ".join(str(text).split())
    while rest and len(lines) < max_lines:
        if fits(rest):
            return [*lines, rest]
        lo, hi = 1, len(rest)  # the longest prefix that fits (widths grow with length: bisect)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(rest[:mid]) else (lo, mid - 1)
        cut = rest.rfind(" ", 0, lo + 1)
        cut = cut if cut > 0 else lo
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        while len(lines[-1]) > 1 and not fits(lines[-1] + "..."):
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def _cell_lines(rank, row, font, prop, width_pt):
    """A cell's text as (line, colour), the same number of lines in every cell: its text area is fixed."""
    def one(text, colour="black"):
        return _fit(text, prop, width_pt, 1)[0], colour

    lines = [one(f"#{rank}  {row.id}  [{row.type}]"),
             one(f"label {row.answer}, predicted {row.pred} ({row.confidence:.2f})")]
    if not font:  # (no Hangul glyphs: the question and options would be boxes; they are in the HTML table)
        return lines + [one("  ".join(f"{letter} {getattr(row, 'p_' + letter):.2f}" for letter in OPTION_LETTERS))]
    question = _fit(row.question, prop, width_pt, QUESTION_LINES)
    lines += [(line, "black") for line in question + [""] * (QUESTION_LINES - len(question))]
    return lines + [one(f"{letter} {getattr(row, 'p_' + letter):.2f}  {getattr(row, letter)}",
                        "#070" if letter == row.answer else "#b00" if letter == row.pred else "black")
                    for letter in OPTION_LETTERS]


def _gallery_figure(rows, font):
    """The thumbnails in a grid, each over a text area of fixed lines: positions in inches, so no text can run
    into an image or another text whatever the fonts measure (tight_layout cannot promise that)."""
    n_lines = 3 if not font else 2 + QUESTION_LINES + len(OPTION_LETTERS)
    cols = min(GALLERY_COLS, max(len(rows), 1))
    grid = (max(len(rows), 1) + cols - 1) // cols
    cell_h = GALLERY_IMAGE_H + n_lines * GALLERY_LINE_H + 3 * GALLERY_PAD
    fig_w, fig_h = cols * GALLERY_CELL_W, grid * cell_h
    fig = Figure(figsize=(fig_w, fig_h), dpi=GALLERY_DPI)
    prop = font_manager.FontProperties(family=[font, "DejaVu Sans"] if font else "DejaVu Sans", size=GALLERY_PT)
    width_pt = 0.95 * (GALLERY_CELL_W - 2 * GALLERY_PAD) * 72  # (measured unhinted; drawn hinted: a margin)
    if not len(rows):
        fig.text(0.5, 0.5, "no wrong out-of-fold predictions", ha="center", va="center")
    for k, row in enumerate(rows.itertuples()):
        left, top = (k % cols) * GALLERY_CELL_W + GALLERY_PAD, fig_h - (k // cols) * cell_h - GALLERY_PAD
        ax = fig.add_axes((left / fig_w, (top - GALLERY_IMAGE_H) / fig_h,
                           (GALLERY_CELL_W - 2 * GALLERY_PAD) / fig_w, GALLERY_IMAGE_H / fig_h))
        ax.imshow(_thumbnail(row.image_path))
        ax.set_anchor("W")  # (the thumbnail over the text's left edge)
        ax.axis("off")
        text_top = top - GALLERY_IMAGE_H - GALLERY_PAD
        for i, (line, colour) in enumerate(_cell_lines(k + 1, row, font, prop, width_pt)):
            if line:
                fig.text(left, text_top - i * GALLERY_LINE_H, line, transform=fig.dpi_scale_trans, va="top",
                         fontproperties=prop, color=colour, parse_math=False)  # ($ in a question is no math)
    return fig


def _gallery_png(rows, out_path, font):
    with warnings.catch_warnings():  # (a font without some glyph warns per glyph, measured or drawn: boxes, no error)
        warnings.simplefilter("ignore")
        _gallery_figure(rows, font).savefig(out_path, dpi=GALLERY_DPI)
    return out_path


def _html_table(rows, columns):
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')) if r.get(c) is not None else '-')}</td>"
                                    for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _stats_rows(rows):
    return [{"group": r["key"], "n": r["n"], "correct": r["correct"],
             "accuracy": "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"} for r in rows]


def _gallery_table(gallery):
    """The gallery rows as one HTML table: thumbnail (inline), id, type, question and options with their
    probabilities (label green, prediction red), label, prediction."""
    parts = ["<table><tr><th>#</th><th>image</th><th>id</th><th>type</th><th>question and options</th>"
             "<th>label</th><th>predicted</th></tr>"]
    for rank, row in enumerate(gallery.itertuples(), 1):
        options = "<br>".join(
            f"<span class='{'right' if letter == row.answer else 'wrong' if letter == row.pred else ''}' style='color:"
            f"{'#070' if letter == row.answer else '#b00' if letter == row.pred else 'inherit'}'>"
            f"{letter}. {html.escape(str(getattr(row, letter)))} ({getattr(row, 'p_' + letter):.3f})</span>"
            for letter in OPTION_LETTERS)
        parts.append(f"<tr class='gallery-row' data-id='{html.escape(row.id)}'><td>{rank}</td>"
                     f"<td><img src='data:image/png;base64,{_thumbnail_base64(row.image_path)}'></td>"
                     f"<td>{html.escape(row.id)}</td><td>{row.type}</td><td>{html.escape(row.question)}<br>{options}"
                     f"</td><td>{row.answer}</td><td>{row.pred} ({row.confidence:.3f})</td></tr>")
    return "\n".join(parts + ["</table>"])


def _page(report, gallery_table, suspects, run_dir):
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mcvqa error analysis</title><style>"
             "body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse;margin:.5em 0 1.5em}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top} .wrong{color:#b00}"
             ".right{color:#070}</style></head><body>",
             f"<h1>Error analysis: {html.escape(str(run_dir))}</h1>",
             f"<p>{report['n_rows']} out-of-fold rows, accuracy {report['accuracy']:.4f}; "
             f"{report['n_wrong']} wrong. Question types by keyword rules (mcvqa/question_types.py).</p>"]
    for name, title in (("by_type", "Accuracy by question type"), ("by_answer", "Accuracy by labelled answer"),
                        ("by_confidence", "Accuracy by confidence (top probability)")):
        parts += [f"<h2>{title}</h2>", _html_table(_stats_rows(report[name]), ("group", "n", "correct", "accuracy")),
                  f"<img src='{html.escape(report['plots'][name])}' alt='{title}'>"]
    parts += [f"<h2>The {len(report['gallery'])} most confident wrong predictions</h2>",
              "<p><img src='wrong_gallery.png' alt='gallery' style='max-width:100%'></p>", gallery_table]
    parts += [f"<h2>Suspect labels ({len(suspects)})</h2>",
              f"<p>Label probability below {report['suspect_label_max']} and another option above "
              f"{report['suspect_other_min']}: possible label noise (suspect_labels.csv).</p>",
              _html_table(suspects.drop(columns="image_path").round(3).to_dict("records"),
                          [c for c in suspects.columns if c != "image_path"]), "</body></html>"]
    return "\n".join(parts)


def _writable_out(run_dir, out_dir):
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(run_dir) / "analysis"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise AnalysisError(f"{out}: cannot write there ({error.strerror}). Fix: --out <a writable folder> "
                            "(e.g. for a read-only run folder)") from None
    return out


def analyze_run(run_dir, data_dir=None, out_dir=None, *, top_n=TOP_N, suspect_label_max=SUSPECT_LABEL_MAX,
                suspect_other_min=SUSPECT_OTHER_MIN, confidence_edges=CONFIDENCE_EDGES):
    """Write the error analysis of a finished run (see the module docstring); returns analysis.json's dict."""
    table = oof_table(run_dir, data_dir)
    out = _writable_out(run_dir, out_dir)
    gallery = confident_wrong(table, top_n)
    suspects = suspect_labels(table, suspect_label_max, suspect_other_min, zero_shot_disputes(run_dir, table))
    font = hangul_font()
    report = {
        "run_dir": str(run_dir), "n_rows": len(table), "accuracy": float(table["correct"].mean()),
        "n_wrong": int((~table["correct"]).sum()),
        "by_type": _group_accuracy(table["type"], table["correct"],
                                   [t for t in QUESTION_TYPES if (table["type"] == t).any()]),
        "by_answer": _group_accuracy(table["answer"], table["correct"], OPTION_LETTERS),
        "by_confidence": confidence_bins(table["confidence"], table["correct"], confidence_edges),
        "gallery": [{"id": r.id, "type": r.type, "answer": r.answer, "pred": r.pred, "confidence": float(r.confidence),
                     "probs": {letter: float(getattr(r, "p_" + letter)) for letter in OPTION_LETTERS}}
                    for r in gallery.itertuples()],
        "top_n": top_n, "suspect_label_max": suspect_label_max, "suspect_other_min": suspect_other_min,
        "suspect_ids": suspects["id"].tolist(),
        "gallery_font": font or "none with Hangul glyphs: the PNG shows ids, letters and probabilities, the text "
                                "is in analysis.html (apt-get install -y fonts-nanum, then analyze again)",
        "plots": {"by_type": "accuracy_by_type.png", "by_answer": "accuracy_by_answer.png",
                  "by_confidence": "accuracy_by_confidence.png", "gallery": "wrong_gallery.png"},
    }
    _bar_chart(report["by_type"], "Accuracy by question type", "question type", out / "accuracy_by_type.png")
    _bar_chart(report["by_answer"], "Accuracy by labelled answer", "answer letter", out / "accuracy_by_answer.png")
    _bar_chart(report["by_confidence"], "Accuracy by confidence", "top probability", out / "accuracy_by_confidence.png")
    _gallery_png(gallery, out / "wrong_gallery.png", font)
    suspects.to_csv(out / "suspect_labels.csv", index=False)
    table = _gallery_table(gallery)  # (a notebook shows gallery.html: the table alone, thumbnails inline)
    if not font:
        table = f"<p class='font-hint'>{FONT_HINT}</p>\n{table}"
    (out / "gallery.html").write_text(table, encoding="utf-8")
    (out / "analysis.html").write_text(_page(report, table, suspects, run_dir), encoding="utf-8")
    (out / "analysis.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"[analysis] {report['n_wrong']} of {report['n_rows']} out-of-fold rows wrong; "
          f"{len(gallery)} in the gallery, {len(suspects)} suspect labels; wrote {out / 'analysis.html'}")
    return report
