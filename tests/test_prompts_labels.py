"""Prompts, answer-letter ids and labels, checked against the REAL Qwen-VL tokenizers and chat templates.

The invariant under test: the token id the collator supervises at training time is the id the
scorer reads at inference time, and both are what the real chat template produces for the answer.
"""

import re

import pytest
import torch
from PIL import Image

from conftest import REAL_PROCESSOR_NAMES, TINY_FAMILIES, demo_config
from mcvqa.speed.feature_cache import CachedImageEncoding
from mcvqa.core.collate import IGNORE_INDEX, VqaCollator
from mcvqa.core.prompts import (
    OPTION_LETTERS,
    PromptFormat,
    answer_letter_ids,
    build_messages,
    format_user_text,
    make_prompt_format,
    render_prompt,
)

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 112 * 112
IM_START, IM_END, NEWLINE, ASSISTANT, USER = 151644, 151645, 198, 77091, 872  # real Qwen2/2.5/3-VL vocabulary
# Where each real template puts the answer letter: the generation prompt's last tokens, and the end of the turn.
# Qwen3.5 (thinking off) writes an empty thinking block first: <think> \n\n </think> \n\n.
ANSWER_HEADER = {name: [IM_START, ASSISTANT, NEWLINE] for name in REAL_PROCESSOR_NAMES}
ANSWER_HEADER["Qwen3.5-0.8B"] = [248045, 74455, NEWLINE, 248068, 271, 248069, 271]
TURN_END = {name: [IM_END, NEWLINE] for name in REAL_PROCESSOR_NAMES}
TURN_END["Qwen3.5-0.8B"] = [248046, NEWLINE]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(params=REAL_PROCESSOR_NAMES)
def real_name(request):
    return request.param


@pytest.fixture
def real(real_name, real_processor):
    return real_processor(real_name)


@pytest.fixture(scope="module")
def cfg():
    return demo_config()


def _tokens(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def assert_scored_id_is_trained_id(processor, fmt, user_text="질문?\na. 1\nb. 2\nc. 3\nd. 4"):
    """For every letter: REAL template's answered conversation == prompt + [letter id] + suffix."""
    tok = processor.tokenizer
    prompt = processor.apply_chat_template(build_messages(user_text, fmt.system_prompt),
                                           add_generation_prompt=True, tokenize=False, enable_thinking=False)
    prompt_ids = _tokens(tok, prompt)
    for letter, letter_id in zip(OPTION_LETTERS, fmt.letter_ids):
        full = processor.apply_chat_template(build_messages(user_text, fmt.system_prompt, letter), tokenize=False,
                                             enable_thinking=False)
        assert _tokens(tok, full) == prompt_ids + [letter_id] + fmt.suffix_ids, letter


# ---------------------------------------------------------------------------------------------- 1
def test_answer_letter_ids_are_bare_letters(real):
    ids = answer_letter_ids(real.tokenizer)
    assert ids == [64, 65, 66, 67]
    assert _tokens(real.tokenizer, " a") == [264]
    assert 264 not in ids
    assert [real.tokenizer.decode([i]) for i in ids] == ["a", "b", "c", "d"]


# ---------------------------------------------------------------------------------------------- 2
def test_prompt_format_matches_real_template(real, real_name, cfg):
    fmt = make_prompt_format(real, cfg)
    assert fmt.letter_ids == [64, 65, 66, 67]
    assert fmt.suffix_ids == TURN_END[real_name]
    assert real.tokenizer.decode(fmt.suffix_ids) == "<|im_end|>\n"
    assert_scored_id_is_trained_id(real, fmt)
    assert_scored_id_is_trained_id(real, fmt, format_user_text("그림 속 도형은?", ["빨간색", "원, 별", "1개", "왼쪽 위"],
                                                                cfg.instruction))


def test_prompt_format_with_system_prompt(real, real_name, cfg):
    fmt = make_prompt_format(real, demo_config(system_prompt="당신은 시험 도우미입니다."))
    assert fmt.suffix_ids == TURN_END[real_name]
    assert_scored_id_is_trained_id(real, fmt)


def test_consistency_check_catches_the_seed_notebook_bug(real, cfg):
    """A scorer reading ' a' (264...) while training wrote 'a' (64...) fails the check above."""
    fmt = make_prompt_format(real, cfg)
    spaced = [_tokens(real.tokenizer, " " + letter)[0] for letter in OPTION_LETTERS]
    assert spaced[0] == 264
    wrong = PromptFormat(spaced, fmt.suffix_ids, fmt.system_prompt, fmt.instruction,
                         fmt.max_question_tokens, fmt.max_option_tokens)
    with pytest.raises(AssertionError):
        assert_scored_id_is_trained_id(real, wrong)


def _items():
    return [
        {"row": 0, "perm": (0, 1, 2, 3), "image": Image.new("RGB", (64, 96), (200, 30, 30)),
         "question": "그림 속 도형은 무슨 색입니까?", "options": ["빨간색", "파란색", "초록색", "노란색"], "answer": 2},
        {"row": 1, "perm": (1, 2, 3, 0), "image": Image.new("RGB", (120, 80), (30, 70, 220)),
         "question": "도형은?", "options": ["원", "사각형, 삼각형", "별", "마름모"], "answer": 0},
        {"row": 2, "perm": (3, 0, 1, 2), "image": Image.new("RGB", (90, 90), (30, 160, 50)),
         "question": "그림에 도형이 몇 개 있습니까?", "options": ["1개", "2개", "3개", "4개"], "answer": -1},
    ]


def test_collator_labels_against_real_processor(real, real_name, cfg):
    fmt = make_prompt_format(real, cfg)
    items = _items()
    batch = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS)(items)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    tok = real.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    mm, pos = batch["mm_token_type_ids"], batch["answer_positions"]
    width = ids.shape[1]
    assert labels.shape == mask.shape == mm.shape == ids.shape
    assert batch["answer_index"].tolist() == [2, 0, -1]
    assert batch["rows"].tolist() == [0, 1, 2]
    assert batch["perms"].tolist() == [[0, 1, 2, 3], [1, 2, 3, 0], [3, 0, 1, 2]]
    grids = []
    for i, item in enumerate(items):
        n = int(mask[i].sum())
        # Right padding: ones then zeros; pad id / -100 / type 0 past the end.
        assert mask[i].tolist() == [1] * n + [0] * (width - n)
        assert (ids[i, n:] == tok.pad_token_id).all() and (labels[i, n:] == IGNORE_INDEX).all()
        assert (mm[i, n:] == 0).all()
        user_text = format_user_text(item["question"], item["options"], cfg.instruction, cfg.instruction_first)
        prompt = real.apply_chat_template(build_messages(user_text, cfg.system_prompt),
                                          add_generation_prompt=True, tokenize=False, enable_thinking=False)
        own = real(text=[prompt], images=[item["image"]], size=size)
        grids.append(own["image_grid_thw"][0].tolist())
        p = int(pos[i])
        assert ids[i, :p + 1].tolist() == list(own["input_ids"][0])
        header = ANSWER_HEADER[real_name]  # the scored position is the template's last header token
        assert ids[i, p - len(header) + 1:p + 1].tolist() == header
        # mm_token_type_ids marks exactly the image pad tokens.
        assert mm[i].tolist() == (ids[i] == image_id).long().tolist()
        assert int(mm[i].sum()) == int(torch.tensor(grids[-1]).prod()) // 4
        supervised = (labels[i] != IGNORE_INDEX).nonzero().flatten().tolist()
        if item["answer"] < 0:
            assert supervised == []
            assert p == n - 1  # test row: the scorer reads the last real token (assistant header "\n")
            continue
        letter_id = fmt.letter_ids[item["answer"]]
        assert supervised == [p + 1]
        assert int(labels[i, p + 1]) == letter_id == int(ids[i, p + 1])
        assert n == p + 1 + 1 + len(fmt.suffix_ids)
        # The whole answered conversation, rendered by the real template, tokenised by the processor.
        full = real.apply_chat_template(build_messages(user_text, cfg.system_prompt, OPTION_LETTERS[item["answer"]]),
                                        tokenize=False, enable_thinking=False)
        assert ids[i, :n].tolist() == list(real(text=[full], images=[item["image"]], size=size)["input_ids"][0])
    assert batch["image_grid_thw"].tolist() == grids
    assert len({tuple(g) for g in grids}) == 3  # three image sizes really gave three grids
    assert batch["pixel_values"].shape[0] == sum(int(torch.tensor(g).prod()) for g in grids)


def test_cache_mode_collator_equals_processor_and_skips_known_and_repeated_images(real, cfg):
    """With the feature cache on, the collator expands the image tokens itself so that it can leave
    out the pixels of cached images and of repeated views of one image. Everything the model reads
    must equal the processor's own output; only pixel_values shrinks, and pixel_rows says whose it is."""
    fmt = make_prompt_format(real, cfg)
    items = _items() + [dict(_items()[0], row=3, perm=(1, 2, 3, 0), answer=-1),  # a second view of image 0
                        dict(_items()[1], row=4, image=Image.new("RGB", (300, 40), (9, 9, 9)))]  # extreme aspect
    plain = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS)(items)
    sizes = plain["image_grid_thw"].prod(1).tolist()
    starts = [sum(sizes[:i]) for i in range(len(items))]

    def pixels_of(rows):
        return torch.cat([plain["pixel_values"][starts[r]:starts[r] + sizes[r]] for r in rows])

    full = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding())(items)
    deduped = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding(dedupe_images=True))(items)
    known = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding([full["image_keys"][1], full["image_keys"][4]], dedupe_images=True))(items)
    half = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS, encoding=CachedImageEncoding(), pixel_dtype=torch.bfloat16)(items)
    for batch in (full, deduped, known, half):
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels", "answer_positions", "image_grid_thw"):
            assert torch.equal(batch[key], plain[key]), key
    assert full["image_keys"][3] == full["image_keys"][0] and len(set(full["image_keys"])) == 4
    assert full["pixel_rows"].tolist() == [0, 1, 2, 3, 4] and torch.equal(full["pixel_values"], plain["pixel_values"])
    assert deduped["pixel_rows"].tolist() == [0, 1, 2, 4] and torch.equal(deduped["pixel_values"], pixels_of([0, 1, 2, 4]))
    assert known["pixel_rows"].tolist() == [0, 2] and torch.equal(known["pixel_values"], pixels_of([0, 2]))
    assert half["pixel_values"].dtype == torch.bfloat16 and torch.equal(half["pixel_values"],
                                                                        plain["pixel_values"].to(torch.bfloat16))


def test_collator_literal_qwen3(real_processor):
    """Hand-checkable case: Qwen3-VL (no default system turn), one 32x32 image = one image token."""
    processor = real_processor("Qwen3-VL-4B-Instruct")
    fmt = make_prompt_format(processor, demo_config(instruction="", system_prompt=""))
    items = [{"row": 0, "perm": (0, 1, 2, 3), "image": Image.new("RGB", (32, 32)), "question": "?",
              "options": ["1", "2", "3", "4"], "answer": 1},
             {"row": 1, "perm": (0, 1, 2, 3), "image": Image.new("RGB", (32, 32)), "question": "?",
              "options": ["1", "2", "3", "x"], "answer": -1}]
    batch = VqaCollator(processor, fmt, 32 * 32, 32 * 32)(items)
    head = [IM_START, USER, NEWLINE, 151652, 151655, 151653,  # <|vision_start|><|image_pad|><|vision_end|>
            5267,  # "?\n"
            64, 13, 220, 16, NEWLINE, 65, 13, 220, 17, NEWLINE, 66, 13, 220, 18, NEWLINE, 67, 13]  # a. 1 ... d.
    tail = [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    assert batch["input_ids"].tolist() == [
        head + [220, 19] + tail + [65, IM_END, NEWLINE],  # " 4", then the answer b + <|im_end|>\n
        head + [856] + tail + [151643] * 4,  # " x", right-padded with <|endoftext|>
    ]
    assert batch["labels"].tolist() == [[-100] * 31 + [65, -100, -100], [-100] * 34]
    assert batch["attention_mask"].tolist() == [[1] * 34, [1] * 30 + [0] * 4]
    assert batch["mm_token_type_ids"].tolist() == [[0] * 4 + [1] + [0] * 29] * 2
    assert batch["answer_positions"].tolist() == [30, 29]
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2]]
    assert batch["answer_index"].tolist() == [1, -1]


def test_collator_literal_labels_tiny(tiny_processor, tiny_fmt, tiny_cfg):
    """Tiny processor: the label row is -100 but for the answer letter right after the prompt."""
    processor, fmt = tiny_processor("qwen2_5_vl"), tiny_fmt("qwen2_5_vl")
    items = [{"row": 0, "perm": (0, 1, 2, 3), "image": Image.new("RGB", (56, 56)), "question": "?",
              "options": ["원", "별", "1개", "2개"], "answer": 3}]
    batch = VqaCollator(processor, fmt, 56 * 56, 56 * 56)(items)
    n_prompt = len(processor.tokenizer.encode(render_prompt(processor, fmt, "?", items[0]["options"])[0]
                                              .replace("<|image_pad|>", "<|image_pad|>" * 4)))
    assert batch["answer_positions"].tolist() == [n_prompt - 1]
    d_id = processor.tokenizer.convert_tokens_to_ids("d")
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fmt.letter_ids[3] == d_id
    assert batch["labels"].tolist() == [[-100] * n_prompt + [d_id, -100, -100]]
    assert batch["input_ids"][0, -3:].tolist() == [d_id, im_end, processor.tokenizer.encode("\n")[0]]


# ---------------------------------------------------------------------------------------------- 3
def _user_text(rendered):
    return rendered.split("<|vision_end|>", 1)[1].split("<|im_end|>", 1)[0]


def test_options_with_commas_and_newlines_stay_one_line_each(real, cfg):
    fmt = make_prompt_format(real, cfg)
    options = ["빨간색, 파란색", "첫째 줄\n둘째 줄", "  앞뒤 공백  \r\n", "탭\t구분"]
    text, n_cut = render_prompt(real, fmt, "  그림 속 도형은\n무슨 색입니까?  ", options)
    assert n_cut == 0
    lines = _user_text(text).split("\n")
    assert cfg.instruction_first  # the default: the instruction between the question and the options
    assert lines == ["그림 속 도형은", "무슨 색입니까?", cfg.instruction,
                     "a. 빨간색, 파란색", "b. 첫째 줄 둘째 줄", "c. 앞뒤 공백", "d. 탭 구분"]
    assert len([line for line in lines if re.match(r"^[a-d]\. ", line)]) == 4


def test_instruction_first_joins_the_prefix_that_option_views_share(real, cfg):
    """instruction_first (the default) puts the instruction between question and options: the trained id
    is still the scored id, and the 4 option orders of a row share a longer prefix (shorter suffixes to
    score) than with the instruction after the options (instruction_first=false)."""
    import dataclasses

    first_cfg, end_cfg = dataclasses.replace(cfg, instruction_first=True), dataclasses.replace(cfg, instruction_first=False)
    fmt = make_prompt_format(real, first_cfg)
    for instruction_first in (True, False):
        assert_scored_id_is_trained_id(real, make_prompt_format(real, end_cfg if not instruction_first else first_cfg),
                                       format_user_text("그림 속 도형은?", ["빨간색", "원, 별", "1개", "왼쪽 위"],
                                                        cfg.instruction, instruction_first=instruction_first))
    text, _ = render_prompt(real, fmt, "그림 속 도형은?", ["빨간색", "파란색", "초록색", "노란색"])
    assert _user_text(text).split("\n") == ["그림 속 도형은?", cfg.instruction, "a. 빨간색", "b. 파란색", "c. 초록색", "d. 노란색"]
    text, _ = render_prompt(real, make_prompt_format(real, end_cfg), "그림 속 도형은?", ["빨간색", "파란색", "초록색", "노란색"])
    assert _user_text(text).split("\n") == ["그림 속 도형은?", "a. 빨간색", "b. 파란색", "c. 초록색", "d. 노란색", cfg.instruction]

    def prefix_and_suffix(fmt):
        item = _items()[0]
        views = [dict(item, perm=p, options=[item["options"][j] for j in p], answer=-1)
                 for p in [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]]
        ids = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS)(views)["input_ids"]
        shared = int((ids == ids[:1]).all(0).long().cumprod(0).sum())
        return shared, ids.shape[1] - shared

    (prefix_end, suffix_end), (prefix_first, suffix_first) = prefix_and_suffix(make_prompt_format(real, end_cfg)), prefix_and_suffix(fmt)
    instruction_tokens = len(_tokens(real.tokenizer, cfg.instruction))
    assert prefix_first >= prefix_end + instruction_tokens - 2 and suffix_first <= suffix_end - instruction_tokens + 2


KOREAN_LONG = "".join(chr(0xAC00 + (i * 7919) % 11172) for i in range(2000))  # 2000 varied syllables


@pytest.mark.parametrize("long_text", ["x" * 2000, "빨간색 파란색 " * 250, KOREAN_LONG], ids=["ascii", "words", "syllables"])
def test_long_question_and_option_are_cut_but_answer_position_is_kept(real, real_name, long_text):
    cfg = demo_config(max_question_tokens=24, max_option_tokens=8)
    fmt = make_prompt_format(real, cfg)
    tok = real.tokenizer
    options = ["짧은 답", long_text, "원", "별"]
    text, n_cut = render_prompt(real, fmt, long_text, options)
    assert n_cut == 2
    lines = _user_text(text).split("\n")
    option_lines = [line for line in lines if re.match(r"^[a-d]\. ", line)]
    assert [line[:3] for line in option_lines] == ["a. ", "b. ", "c. ", "d. "]
    assert option_lines[0] == "a. 짧은 답" and option_lines[2:] == ["c. 원", "d. 별"]
    assert len(_tokens(tok, option_lines[1][3:])) <= cfg.max_option_tokens
    assert lines[lines.index(option_lines[0]) - 1] == cfg.instruction  # never cut (instruction_first: before the options)
    question = "\n".join(lines[:lines.index(option_lines[0]) - 1])
    assert 0 < len(_tokens(tok, question)) <= cfg.max_question_tokens
    assert tok.encode(text, add_special_tokens=False)[-len(ANSWER_HEADER[real_name]):] == ANSWER_HEADER[real_name]
    # Collated with an answer: the one label is still the letter right after the assistant header.
    item = {"row": 0, "perm": (0, 1, 2, 3), "image": Image.new("RGB", (64, 64)), "question": long_text,
            "options": options, "answer": 1}
    batch = VqaCollator(real, fmt, MIN_PIXELS, MAX_PIXELS)([item])
    p = int(batch["answer_positions"][0])
    header = ANSWER_HEADER[real_name]
    assert batch["input_ids"][0, p - len(header) + 1:p + 2].tolist() == header + [65]
    assert (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten().tolist() == [p + 1]
    assert batch["input_ids"].shape[1] < 200  # a 2000-character field did not survive


@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen3-VL-4B-Instruct"])
def test_cut_korean_text_leaves_no_replacement_character(real_processor, name):
    processor = real_processor(name)
    fmt = make_prompt_format(processor, demo_config(max_question_tokens=64, max_option_tokens=64))
    text, n_cut = render_prompt(processor, fmt, "빨간색 " * 400, ["빨간색 " * 400, "원", "별", "1개"])
    assert n_cut == 2
    assert "\ufffd" not in text


def test_cut_korean_option_fits_token_budget_on_byte_level_tokenizer(tiny_processor, tiny_fmt):
    processor, fmt = tiny_processor("qwen2_5_vl"), tiny_fmt("qwen2_5_vl")
    text, _ = render_prompt(processor, fmt, "?", [KOREAN_LONG, "원", "별", "1개"])
    option = [line for line in _user_text(text).split("\n") if line.startswith("a. ")][0][3:]
    assert len(_tokens(processor.tokenizer, option)) <= fmt.max_option_tokens


# ---------------------------------------------------------------------------------------------- 4
class _FakeTokenizer:
    """encode() from a fixed table; anything else is one id per character."""

    def __init__(self, table):
        self.table = table

    def encode(self, text, add_special_tokens=False):
        if text in self.table:
            return list(self.table[text])
        if text.startswith("<|im_start|>assistant\n"):
            return [1, 2, 3] + self.encode(text[len("<|im_start|>assistant\n"):])
        return [ord(ch) for ch in text]


def test_answer_letter_ids_rejects_multi_token_letter():
    with pytest.raises(ValueError, match=r"'c' is 2 tokens"):
        answer_letter_ids(_FakeTokenizer({"c": [99, 100]}))


def test_answer_letter_ids_rejects_letter_that_merges_after_header():
    tok = _FakeTokenizer({"<|im_start|>assistant\nb": [1, 2, 500]})
    with pytest.raises(ValueError, match=r"letter 'b'"):
        answer_letter_ids(tok)


def test_answer_letter_ids_accepts_clean_fake():
    assert answer_letter_ids(_FakeTokenizer({})) == [ord("a"), ord("b"), ord("c"), ord("d")]


def test_templates_get_only_the_switches_they_read(tiny_processor, caplog):
    """enable_thinking=False goes to the templates that read it (Qwen3.5, Gemma 4); passed to one that does not,
    transformers logs a warning per rendering (2,522 lines in one Qwen2.5-VL benchmark log)."""
    import logging

    from mcvqa.core.prompts import template_kwargs

    assert template_kwargs(tiny_processor("qwen2_5_vl")) == {}
    if "qwen3_5" in TINY_FAMILIES:
        assert template_kwargs(tiny_processor("qwen3_5")) == {"enable_thinking": False}
    processor = tiny_processor("qwen2_5_vl")
    with caplog.at_level(logging.WARNING):
        fmt = make_prompt_format(processor, demo_config())
        render_prompt(processor, fmt, "질문?", ["a", "b", "c", "d"])
    assert not [r for r in caplog.records if "processor_kwargs" in r.getMessage()]


def test_prompt_repeat_writes_question_and_options_twice_the_image_once_and_keeps_the_label(
        tiny_processor, tiny_model, tmp_path):
    """prompt_repeat (the 0.972 single model's trick): the user text twice, one image, the label still on the
    letter the scorer reads, and the option orders of a row still share a prefix (the question, once)."""
    from mcvqa.speed.feature_cache import FeatureCache
    from mcvqa.speed.shared_prefix import shared_prefix_letter_logits
    from mcvqa.core.scoring import letter_logits

    processor = tiny_processor("qwen2_5_vl")
    fmt = make_prompt_format(processor, demo_config(prompt_repeat=True))
    plain = make_prompt_format(processor, demo_config())
    question, options = "그림 속 도형은 무슨 색입니까?", ["빨간색", "파란색", "초록색", "노란색"]
    text, _ = render_prompt(processor, fmt, question, options)
    assert text.count(question) == 2 and text.count("b. 파란색") == 2 and text.count("<|vision_start|>") == 1
    assert render_prompt(processor, plain, question, options)[0].count(question) == 1
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    views = [{"row": 0, "perm": p, "image": image, "question": question, "options": [options[i] for i in p],
              "answer": p.index(0)} for p in [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]]
    batch = VqaCollator(processor, fmt, 56 * 56, 56 * 56, encoding=CachedImageEncoding())(views)
    for row in range(4):
        labelled = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == [int(batch["answer_positions"][row]) + 1]
        assert int(batch["labels"][row, labelled[0]]) == fmt.letter_ids[views[row]["answer"]]
    model = tiny_model("qwen2_5_vl", False)
    with torch.no_grad():
        cached = FeatureCache().attach(model, batch)
        exact = letter_logits(model, cached, fmt.letter_ids, "cpu", None)
        shared = shared_prefix_letter_logits(model, cached, fmt.letter_ids, "cpu", n_views=4)
    torch.testing.assert_close(shared, exact, atol=1e-5, rtol=1e-4)
