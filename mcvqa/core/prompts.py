"""## Prompts and labels: one chat template, one set of answer-token ids

The model is asked through the processor's own chat template: (optional system) + user turn with the
image, the question and the options `a. ...` to `d. ...` + assistant turn holding one letter. Training
supervises exactly that letter token (labels are -100 everywhere else, `<|im_end|>` included: the
scorer never reads it, so training it would only spend capacity). The inference prompt is the training
text cut at the answer position, checked by construction below: a public notebook for this competition
trained on `a` (id 64) and scored ` a` (id 264); here both read the ids from `answer_letter_ids`.
"""

import dataclasses

from .data import OPTION_LETTERS



# Chat-template arguments for every rendering, training and scoring alike: thinking off. Qwen3.5's 4B-and-larger
# templates default to thinking (the answer would follow an open `<think>`); off, an empty thinking block precedes
# the letter. Templates without the switch (Qwen2/2.5/3-VL) ignore it.
TEMPLATE_KWARGS = {"enable_thinking": False}


def template_kwargs(processor):
    """TEMPLATE_KWARGS the processor's template reads: transformers logs a warning for every rendering that passes
    a variable its template does not use (2,522 lines in one Qwen2.5-VL benchmark log, BENCHMARKS.md run 30)."""
    template = str(processor.chat_template or "")
    return {name: value for name, value in TEMPLATE_KWARGS.items() if name in template}
# Empty thinking blocks a template writes at the end of the generation prompt but drops from an answered
# conversation's history: Gemma 4 26B/31B open an empty thought channel before the answer even with thinking
# off. The model writes the letter after it, so the letter is trained and scored there.
EMPTY_THOUGHT_BLOCKS = ("<|channel>thought\n<channel|>",)


def answer_letter_ids(tokenizer, header="<|im_start|>assistant\n"):
    """Token ids of 'a'..'d' as they appear right after `header` (the rendered generation prompt's end: what
    the model reads before it answers); each must be one token, the same id alone and there."""
    ids = []
    for letter in OPTION_LETTERS:
        alone = tokenizer.encode(letter, add_special_tokens=False)
        if len(alone) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(alone)} tokens {alone}; the scorer needs one token")
        # In context a BPE could merge differently; require the same id there.
        in_context = tokenizer.encode(header + letter, add_special_tokens=False)
        if in_context[-1] != alone[0]:
            raise ValueError(f"letter {letter!r} tokenizes as {alone} alone but {in_context[-1]} after {header!r}")
        ids.append(alone[0])
    return ids


def _cut_tokens(tokenizer, text, max_tokens):
    """Cut text to max_tokens tokens; returns (text, was_cut). Never touches the answer position."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text, False
    # Byte-level BPE can end the cut inside a multi-byte (Korean) character: step back to a whole one.
    keep = max_tokens
    cut = tokenizer.decode(ids[:keep])
    while keep > 0 and cut.endswith("\ufffd") and not text.startswith(cut):
        keep -= 1
        cut = tokenizer.decode(ids[:keep])
    return cut, True


def format_user_text(question, options, instruction, instruction_first=False, repeat=False):
    """Question, the four options one per line, then the answer instruction (or the instruction
    before the options: then option-order TTA views share it in their common prefix). `repeat`: all of it
    written twice (the image stays once), as the 0.972 single model of a 2026 sister competition did: read a
    second time, every option token can attend to the whole question and all four options."""
    if repeat:
        once = format_user_text(question, options, instruction, instruction_first)
        return f"{once}\n\n{once}"
    # An option's own line breaks would read as new options; fold them into spaces.
    lines = [question.strip()]
    if instruction and instruction_first:
        lines.append(instruction)
    lines += [f"{letter}. {' '.join(str(option).split())}" for letter, option in zip(OPTION_LETTERS, options)]
    if instruction and not instruction_first:
        lines.append(instruction)
    return "\n".join(lines)


def build_messages(user_text, system_prompt="", answer_letter=None):
    """Messages in the processor's chat format; the image goes first, as in Qwen's examples."""
    # The system turn's content as a plain string: Gemma 4's template writes a list there as its Python repr
    # ("[{'type': 'text', ...}]"); the Qwen templates render both forms alike.
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]})
    if answer_letter is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer_letter}]})
    return messages


@dataclasses.dataclass
class PromptFormat:
    """Everything needed to turn a row into a prompt and to read the answer: built once per processor."""

    letter_ids: list  # token ids of a, b, c, d: trained AND scored
    suffix_ids: list  # tokens the template puts after the answer letter (not supervised)
    system_prompt: str
    instruction: str
    max_question_tokens: int
    max_option_tokens: int
    instruction_first: bool = False
    repeat: bool = False  # the question and options written twice (config prompt_repeat)


def make_prompt_format(processor, cfg):
    """Check the template once: prompt + letter + suffix must equal the full rendered conversation."""
    tokenizer = processor.tokenizer
    user_text = format_user_text("?", ["1", "2", "3", "4"], cfg.instruction, cfg.instruction_first, cfg.prompt_repeat)
    prompt = processor.apply_chat_template(build_messages(user_text, cfg.system_prompt), add_generation_prompt=True,
                                           tokenize=False, **template_kwargs(processor))
    full = processor.apply_chat_template(build_messages(user_text, cfg.system_prompt, "a"), tokenize=False,
                                         **template_kwargs(processor))
    # The letters' ids where this template puts the answer (after Qwen3.5's empty thinking block, say).
    letter_ids = answer_letter_ids(tokenizer, header=prompt)
    answered = answer_start(prompt, full)
    if answered is None:
        raise ValueError("chat template: the generation prompt is not a prefix of the answered conversation:\n"
                         f"{prompt!r}\n{full!r}")
    suffix_ids = tokenizer.encode(full[answered + 1:], add_special_tokens=False)
    return PromptFormat(letter_ids, suffix_ids, cfg.system_prompt, cfg.instruction,
                        cfg.max_question_tokens, cfg.max_option_tokens, cfg.instruction_first, cfg.prompt_repeat)


def answer_start(prompt, full):
    """Where the letter "a" sits in the answered conversation `full` when the model answers `prompt` (None: the
    two disagree): right after the prompt, or after the prompt less an empty thought block the history drops."""
    if full.startswith(prompt + "a"):
        return len(prompt)
    for block in EMPTY_THOUGHT_BLOCKS:
        head = prompt.removesuffix(block)
        if head != prompt and full.startswith(head + "a"):
            return len(head)
    return None


def render_prompt(processor, fmt, question, options):
    """The inference prompt text (ends with the assistant header). Returns (text, n_fields_cut)."""
    tokenizer = processor.tokenizer
    question, cut = _cut_tokens(tokenizer, question, fmt.max_question_tokens)
    n_cut = int(cut)
    kept = []
    for option in options:
        option, cut = _cut_tokens(tokenizer, str(option), fmt.max_option_tokens)
        kept.append(option)
        n_cut += int(cut)
    user_text = format_user_text(question, kept, fmt.instruction, fmt.instruction_first, fmt.repeat)
    text = processor.apply_chat_template(build_messages(user_text, fmt.system_prompt), add_generation_prompt=True,
                                         tokenize=False, **template_kwargs(processor))
    return text, n_cut
