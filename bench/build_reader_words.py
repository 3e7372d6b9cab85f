"""## Draw the reader stand-in's Korean words once: a glyph atlas committed beside the generator

    python bench/build_reader_words.py --font /usr/share/fonts/truetype/nanum/NanumGothicBold.ttf

The reader competition (mcvqa/demo/reader_data.py) draws short Korean words into its images. Few machines have a
Hangul font (this workplace's and CI's have none), so the words are rendered here once, from NanumGothic Bold
(SIL Open Font License 1.1; Debian's `fonts-nanum`: `apt-get download fonts-nanum && dpkg -x fonts-nanum_*.deb
/tmp/nanum`), into `mcvqa/demo/reader_words.png`: one grey-level mask per word, stacked in rows of equal size in
the order of `READER_WORDS`. The generator only pastes and colours these masks: no font needed to run it.
"""
import argparse
import pathlib
import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from mcvqa.demo.reader_data import READER_WORDS, READER_WORDS_ATLAS, READER_WORD_CELL  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--font", required=True, help="a TrueType font with Hangul (NanumGothicBold.ttf)")
    parser.add_argument("--out", default=str(READER_WORDS_ATLAS))
    args = parser.parse_args(argv)
    width, height = READER_WORD_CELL
    atlas = Image.new("L", (width, height * len(READER_WORDS)), 0)
    for row, word in enumerate(READER_WORDS):
        # The largest size whose drawing fits the cell, centred: every word fills its cell's width or height.
        for size in range(height, 4, -1):
            font = ImageFont.truetype(args.font, size)
            left, top, right, bottom = font.getbbox(word)
            if right - left <= width - 2 and bottom - top <= height - 2:
                break
        cell = Image.new("L", (width, height), 0)
        ImageDraw.Draw(cell).text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), word,
                                  fill=255, font=font)
        atlas.paste(cell, (0, row * height))
    atlas.save(args.out, optimize=True)
    print(f"wrote {args.out} ({pathlib.Path(args.out).stat().st_size} bytes): {', '.join(READER_WORDS)}")


if __name__ == "__main__":
    main()
