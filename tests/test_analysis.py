"""Error analysis of a run (mcvqa/analysis.py) on a small planted run folder whose numbers are worked out by
hand below, and the question-type rules (mcvqa/question_types.py) on the real demo questions."""

import json
import pathlib
import re
import shutil

import pandas as pd
import pytest
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

import mcvqa.toolkit.analysis as analysis
from mcvqa.toolkit.analysis import AnalysisError, analyze_run
from mcvqa.cli import main
from mcvqa.demo.demo_data import generate_demo_dataset
from mcvqa.toolkit.question_types import QUESTION_TYPES, question_type

QUESTIONS = {
    "count": "그림에 사과가 몇 개 있습니까?",
    "color": "자동차는 무슨 색입니까?",
    "position": "고양이는 어느 쪽에 있습니까?",
    "what": "사람이 들고 있는 것은 무엇입니까?",
    "text": "간판에 쓰여 있는 글자는 무엇입니까?",
    "other": "이 사진의 분위기는 어떻습니까?",
}
# id: (type, label, out-of-fold probabilities a-d). Predicted letter, top probability and right/wrong:
PLANTED = {
    "R00": ("count", "a", (0.90, 0.05, 0.03, 0.02)),  # a 0.90 right
    "R01": ("count", "b", (0.60, 0.30, 0.05, 0.05)),  # a 0.60 wrong
    "R02": ("color", "c", (0.10, 0.10, 0.70, 0.10)),  # c 0.70 right
    "R03": ("color", "d", (0.02, 0.95, 0.02, 0.01)),  # b 0.95 wrong, suspect (label 0.01, b 0.95)
    "R04": ("position", "a", (0.35, 0.30, 0.20, 0.15)),  # a 0.35 right
    "R05": ("what", "b", (0.05, 0.85, 0.05, 0.05)),  # b 0.85 right
    "R06": ("what", "a", (0.05, 0.05, 0.88, 0.02)),  # c 0.88 wrong, suspect (label 0.05, c 0.88)
    "R07": ("text", "d", (0.20, 0.20, 0.20, 0.40)),  # d 0.40 right
    "R08": ("other", "c", (0.50, 0.20, 0.10, 0.20)),  # a 0.50 wrong (label 0.10: not below 0.1)
    "R09": ("other", "a", (0.09, 0.81, 0.05, 0.05)),  # b 0.81 wrong, suspect (label 0.09, b 0.81)
    "R10": ("count", "d", (0.10, 0.10, 0.15, 0.65)),  # d 0.65 right
    "R11": ("color", "a", (0.05, 0.75, 0.18, 0.02)),  # b 0.75 wrong, not suspect (label 0.05 but b only 0.75)
}
WRONG_BY_CONFIDENCE = ["R03", "R06", "R09", "R11", "R01", "R08"]
OPTIONS = {"a": "사과", "b": "배", "c": "포도", "d": "귤"}
# Longer than a gallery cell is wide: the question takes its lines and is cut, each option its one line.
LONG_TAIL = " 사진 속 장면을 처음부터 끝까지 자세히 살펴본 다음 보기 가운데 가장 알맞은 답을 하나만 고르십시오" * 3
LONG_OPTIONS = {letter: f"{word} 한 상자와 그 옆에 놓인 바구니 안의 {word} 여러 개" for letter, word in OPTIONS.items()}
HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")
TEST_FONT = "Mcvqa Test Hangul"


def _plant(tmp_path, tail="", options=OPTIONS):
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "train").mkdir(parents=True)
    run.mkdir()
    rows, oof = [], []
    for k, (row_id, (kind, label, probs)) in enumerate(PLANTED.items()):
        Image.new("RGB", (40, 30), (20 * k, 100, 200)).save(data / "train" / f"{row_id}.png")
        rows.append({"id": row_id, "path": f"train/{row_id}.png", "question": QUESTIONS[kind] + tail, **options,
                     "answer": label})
        oof.append({"id": row_id, **dict(zip(("p_a", "p_b", "p_c", "p_d"), probs)), "fold": k % 3, "answer": label})
    pd.DataFrame(rows).to_csv(data / "train.csv", index=False)
    pd.DataFrame(oof).to_csv(run / "oof_probs.csv", index=False)
    (run / "config.json").write_text(json.dumps({"data_dir": str(data)}))
    return run


@pytest.fixture
def planted_run(tmp_path):
    return _plant(tmp_path)


def _by_key(rows):
    return {row["key"]: (row["n"], row["correct"]) for row in rows}


def test_accuracy_by_type_letter_and_confidence_match_the_hand_count(planted_run):
    report = analyze_run(planted_run)
    assert report["n_rows"] == 12 and report["n_wrong"] == 6 and report["accuracy"] == pytest.approx(6 / 12)
    assert _by_key(report["by_type"]) == {"count": (3, 2), "color": (3, 1), "position": (1, 1), "what": (2, 1),
                                          "text": (1, 1), "other": (2, 0)}
    assert _by_key(report["by_answer"]) == {"a": (5, 2), "b": (2, 1), "c": (2, 1), "d": (3, 2)}
    # Bins [lo, hi), the last closed: 0.40, 0.70 and 0.85 sit on edges and go up.
    assert _by_key(report["by_confidence"]) == {"[0.25, 0.40)": (1, 1), "[0.40, 0.55)": (2, 1),
                                                "[0.55, 0.70)": (2, 1), "[0.70, 0.85)": (3, 1),
                                                "[0.85, 1.00]": (4, 2)}
    assert report["by_answer"][0]["accuracy"] == pytest.approx(2 / 5)
    out = planted_run / "analysis"
    for name in ("accuracy_by_type.png", "accuracy_by_answer.png", "accuracy_by_confidence.png",
                 "wrong_gallery.png", "analysis.html", "suspect_labels.csv"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "analysis.json").read_text())["by_type"] == report["by_type"]


@pytest.mark.parametrize("top_n", [4, 10])
def test_the_gallery_lists_the_wrong_rows_most_confident_first(planted_run, top_n):
    report = analyze_run(planted_run, top_n=top_n)
    expected = WRONG_BY_CONFIDENCE[:top_n]
    assert [row["id"] for row in report["gallery"]] == expected
    page = (planted_run / "analysis" / "analysis.html").read_text()
    assert re.findall(r"data-id='([^']+)'", page) == expected
    assert page.count("data:image/png;base64,") == len(expected)  # each listed row with its thumbnail
    assert QUESTIONS["text"] not in page  # R07, the only text question, is right: not listed


def test_suspect_labels_are_the_confidently_disputed_rows(planted_run):
    analyze_run(planted_run)
    suspects = pd.read_csv(planted_run / "analysis" / "suspect_labels.csv")
    assert suspects["id"].tolist() == ["R03", "R06", "R09"]
    assert suspects["model_says"].tolist() == ["b", "c", "b"]
    assert suspects["p_answer"].tolist() == pytest.approx([0.01, 0.05, 0.09])
    stricter = analyze_run(planted_run, suspect_label_max=0.1, suspect_other_min=0.9)
    assert stricter["suspect_ids"] == ["R03"]


def test_the_base_models_label_check_adds_rows_whose_label_is_outside_its_top_2(planted_run):
    """zero_shot_label_check: the folds' zero-shot probabilities; a label ranked 3rd or 4th by the base model makes the
    row a suspect even where the trained model agrees with the label; 2nd does not."""
    zero_shot = {"R00": (0.1, 0.5, 0.3, 0.1),  # label a 3rd (two above it): suspect
                 "R05": (0.4, 0.3, 0.2, 0.1),  # label b 2nd: not
                 "R10": (0.4, 0.3, 0.2, 0.1)}  # label d 4th: suspect
    for fold in range(2):
        (planted_run / f"fold{fold}").mkdir()
        ids = [i for k, i in enumerate(zero_shot) if k % 2 == fold]
        pd.DataFrame([{"id": i, **dict(zip(("p_a", "p_b", "p_c", "p_d"), zero_shot[i]))} for i in ids]).to_csv(
            planted_run / f"fold{fold}" / "zero_shot_oof_probs.csv", index=False)
    analyze_run(planted_run)
    suspects = pd.read_csv(planted_run / "analysis" / "suspect_labels.csv", dtype={"id": str})
    assert sorted(suspects["id"]) == ["R00", "R03", "R06", "R09", "R10"]
    assert suspects.set_index("id")["base_model_disputes"].to_dict() == {
        "R00": True, "R03": False, "R06": False, "R09": False, "R10": True}


def test_read_only_run_writes_elsewhere_through_the_cli(planted_run, tmp_path, capsys, monkeypatch):
    files = sorted(p.name for p in planted_run.iterdir())
    assert main(["analyze", str(planted_run), "--out", str(tmp_path / "elsewhere"), "--top", "2"]) == 0
    assert sorted(p.name for p in planted_run.iterdir()) == files  # nothing written into the run folder
    assert json.loads((tmp_path / "elsewhere" / "analysis.json").read_text())["top_n"] == 2
    # A font with Hangul glyphs puts the text into the PNG as well (here: any font, glyphs or not).
    monkeypatch.setattr(analysis, "hangul_font", lambda: "DejaVu Sans")
    assert main(["analyze", str(planted_run), "--out", str(tmp_path / "font")]) == 0
    assert (tmp_path / "font" / "wrong_gallery.png").stat().st_size > 0
    assert main(["analyze", str(planted_run), "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere/train.csv: not found (--data-dir). Fix: --data-dir" in err and "Traceback" not in err


def test_question_types_of_the_real_demo_questions(tmp_path):
    data = generate_demo_dataset(tmp_path / "demo", n_train=8, n_test=4, image_size=64)
    train = pd.read_csv(data / "train.csv").merge(pd.read_csv(data / "demo_meta.csv"), on="id")
    expected = {"colour": "color", "shape": "what", "count": "count", "position": "position"}
    assert set(train["qtype"]) == set(expected)
    for question, qtype in zip(train["question"], train["qtype"]):
        assert question_type(question) == expected[qtype], question


@pytest.mark.parametrize("question, kind", [
    ("빨간색 도형은 몇 개입니까?", "count"),  # count before colour (빨간색 contains 색)
    ("글자는 무슨 색입니까?", "color"),  # colour before text and what
    ("왼쪽에 쓰여 있는 글자는?", "text"),  # text before position
    ("무엇이 왼쪽에 있습니까?", "position"),  # position before what
    ("표지판의 문구는 무엇입니까?", "text"),
    ("상자 안의 물건은 무엇입니까?", "what"),
    ("사진은 실내입니까, 실외입니까?", "other"),
])
def test_question_type_precedence(question, kind):
    assert question_type(question) == kind and kind in QUESTION_TYPES


def test_a_folder_without_oof_probs_is_refused_with_the_fix(tmp_path):
    with pytest.raises(AnalysisError, match=r"oof_probs\.csv: not found.*Fix: pass the output_dir"):
        analyze_run(tmp_path)


# --- the gallery PNG: the Hangul font and the layout ------------------------------------------------------

def _make_hangul_font(path):
    """A small TrueType font with glyphs for ASCII and every Hangul syllable (plain boxes, Hangul 1 em wide as in
    CJK fonts), made here: the tests need no Hangul font on the machine."""
    def box(advance):
        pen = TTGlyphPen(None)
        for point in ((60, 0), (60, 700), (advance - 60, 700), (advance - 60, 0)):
            (pen.lineTo if pen.points else pen.moveTo)(point)
        pen.closePath()
        return pen.glyph()

    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", "latin", "hangul"])
    builder.setupCharacterMap({**{c: "latin" for c in range(0x20, 0x7F)}, **{c: "hangul" for c in range(0xAC00, 0xD7A4)}})
    builder.setupGlyf({".notdef": TTGlyphPen(None).glyph(), "latin": box(600), "hangul": box(1000)})
    builder.setupHorizontalMetrics({".notdef": (500, 0), "latin": (600, 60), "hangul": (1000, 60)})
    builder.setupHorizontalHeader(ascent=880, descent=-120)
    builder.setupNameTable({"familyName": TEST_FONT, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    builder.setupPost()
    builder.save(path)
    return path


@pytest.fixture
def font_folder(tmp_path, monkeypatch):
    """The machine's font folders are this empty folder, and matplotlib's font cache (fontManager) knows no Hangul
    font: as on a machine where none is installed, or where one was installed after the cache was built (Colab's
    `apt-get install fonts-nanum`). What the code adds to the cache goes when the test ends."""
    folder = tmp_path / "fonts"
    folder.mkdir()
    search = font_manager.findSystemFonts
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda fontpaths=None, fontext="ttf": search([str(folder)], fontext))
    manager = font_manager.fontManager
    monkeypatch.setattr(manager, "ttflist", [font for font in manager.ttflist
                                             if font.name not in analysis.HANGUL_FONTS and font.name != TEST_FONT])
    return folder


@pytest.fixture
def saved_figures(monkeypatch):
    """{file name: figure} of every figure the analysis saves."""
    saved = {}

    class Recorded(Figure):
        def savefig(self, fname, *args, **kwargs):
            saved[pathlib.Path(fname).name] = self
            self.saved_dpi = kwargs.get("dpi", self.dpi)  # (text scales with dpi in whole pixels: measure at it)
            return super().savefig(fname, *args, **kwargs)

    monkeypatch.setattr(analysis, "Figure", Recorded)
    return saved


def _drawn_texts(fig):
    """The figure's non-empty texts that are drawn (not the tick labels of axes turned off)."""
    hidden = {t for ax in fig.axes if not ax.axison for axis in (ax.xaxis, ax.yaxis) for t in axis.findobj(Text)}
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text() and t not in hidden]


def _assert_legible(fig):
    """No text overlaps another text or an image, and all of it lies inside the figure. Each line of a text needs at
    least its font size of height: matplotlib spaces lines by the height of "lp" above the baseline, and Hangul
    glyphs, as tall as the em and reaching below the baseline, then run into the next line. Boxes get a margin of
    0.15 em: the layout measures glyphs without hinting, the renderer draws them hinted."""
    fig.set_dpi(fig.saved_dpi)
    renderer = FigureCanvasAgg(fig).get_renderer()
    texts = []
    for t in _drawn_texts(fig):
        em = t.get_fontsize() * fig.dpi / 72
        box = t.get_window_extent(renderer)
        assert box.height >= (t.get_text().count("\n") + 1) * em, f"lines overlap in {t.get_text()!r}"
        texts.append((t.get_text(), box.padded(0.15 * em)))
    images = [ax.get_window_extent(renderer) for ax in fig.axes if ax.images]
    assert texts and images
    for i, (text, box) in enumerate(texts):
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0 and box.y1 <= fig.bbox.y1, text
        assert not [other for other, other_box in texts[i + 1:] if box.overlaps(other_box)], text
        assert not any(box.overlaps(image) for image in images), text


def test_a_hangul_font_installed_after_matplotlibs_cache_was_built_is_found(font_folder):
    assert analysis.hangul_font() is None
    (font_folder / "truetype" / "nanum").mkdir(parents=True)  # where apt-get install fonts-nanum puts it
    nanum = _make_hangul_font(font_folder / "truetype" / "nanum" / "NanumGothic.ttf")
    assert TEST_FONT not in {font.name for font in font_manager.fontManager.ttflist}  # the stale cache
    assert analysis.hangul_font() == TEST_FONT  # found by its file, and added to the cache for the plots
    assert font_manager.findfont(font_manager.FontProperties(family=TEST_FONT), fallback_to_default=False) == str(nanum)


def test_a_font_file_named_like_a_hangul_font_without_its_glyphs_is_not_taken(font_folder):
    shutil.copy(font_manager.findfont("DejaVu Sans"), font_folder / "NanumGothic.ttf")  # it would draw boxes
    assert analysis.hangul_font() is None


def test_the_gallery_draws_the_korean_text_wrapped_beside_nothing_it_overlaps(tmp_path, font_folder, saved_figures):
    _make_hangul_font(font_folder / "NanumGothic.ttf")
    run = _plant(tmp_path, LONG_TAIL, LONG_OPTIONS)
    report = analyze_run(run)
    assert report["gallery_font"] == TEST_FONT
    gallery = saved_figures["wrong_gallery.png"]
    drawn = [t.get_text() for t in _drawn_texts(gallery)]
    assert len([ax for ax in gallery.axes if ax.images]) == len(WRONG_BY_CONFIDENCE)
    # Each cell: its question from the start over several lines, cut at the end; each option in one line.
    assert sum(line.startswith(QUESTIONS["color"]) for line in drawn) == 2  # R03 and R11
    assert any(line.endswith("...") for line in drawn)
    assert sum(LONG_OPTIONS["b"][:6] in line for line in drawn) == len(WRONG_BY_CONFIDENCE)
    _assert_legible(gallery)
    assert "fonts-nanum" not in (run / "analysis" / "gallery.html").read_text()


def test_without_a_hangul_font_no_hangul_reaches_the_png_and_the_page_says_how_to_get_one(tmp_path, font_folder,
                                                                                       saved_figures):
    run = _plant(tmp_path, LONG_TAIL, LONG_OPTIONS)
    report = analyze_run(run)
    assert report["gallery_font"].startswith("none")
    drawn = [t.get_text() for fig in saved_figures.values() for t in _drawn_texts(fig)]
    assert any("R03" in line for line in drawn)  # the ids, letters and probabilities are drawn ...
    assert not [line for line in drawn if HANGUL.search(line)]  # ... and no Hangul, which would be boxes
    _assert_legible(saved_figures["wrong_gallery.png"])
    for page in ("gallery.html", "analysis.html"):
        assert "apt-get install -y fonts-nanum" in (run / "analysis" / page).read_text(), page


def test_hard_rows_are_the_wrong_and_the_nearly_wrong(tmp_path):
    import pandas as pd
    import pytest

    from mcvqa.toolkit.analysis import AnalysisError, hard_row_ids

    pd.DataFrame({"id": ["1", "2", "3", "4"], "p_a": [0.9, 0.1, 0.45, 0.7], "p_b": [0.05, 0.8, 0.4, 0.1],
                  "p_c": [0.03, 0.05, 0.1, 0.1], "p_d": [0.02, 0.05, 0.05, 0.1],
                  "answer": ["a", "a", "a", "a"]}).to_csv(tmp_path / "oof_probs.csv", index=False)
    # 1: right and sure; 2: wrong; 3: right by a margin of 0.05; 4: right by 0.6
    assert hard_row_ids(tmp_path, 0.2) == {"2", "3"}
    assert hard_row_ids(tmp_path, 0.01) == {"2"}
    with pytest.raises(AnalysisError, match=r"hard_rows_from=.*: no oof_probs.csv there"):
        hard_row_ids(tmp_path / "nothing", 0.2)
