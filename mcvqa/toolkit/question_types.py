"""## Question types: keyword rules on the Korean question text

One function, `question_type`, shared by the blend (`--per-type` weights, blend.py) and the error
analysis (accuracy by type, analysis.py). The first rule whose keyword appears in the question wins,
so the order settles mixed questions: "빨간색 도형은 몇 개입니까?" counts (count before colour: 빨간색
contains 색), "글자는 무슨 색입니까?" asks a colour (colour before text and what), "왼쪽에 쓰여 있는 글자는?"
reads text (text before position), "무엇이 왼쪽에 있습니까?" asks a position (position before what).
"""

import unicodedata

# (type, keywords): checked in this order, the first match wins.
QUESTION_TYPE_RULES = (
    ("count", ("몇", "개수", "갯수")),
    ("color", ("색",)),
    ("text", ("글자", "글씨", "쓰여", "쓰인", "적혀", "적힌", "텍스트", "문구", "문자")),
    ("position", ("위치", "어느 쪽", "어느쪽", "어디", "어느 부분", "왼쪽", "오른쪽", "위쪽", "아래", "위에", "위의",
                  "가운데", "중앙")),
    ("what", ("무엇", "무슨", "뭐", "어떤")),
)
QUESTION_TYPES = tuple(name for name, _ in QUESTION_TYPE_RULES) + ("other",)


def question_type(text):
    """The question's type: count | color | text | position | what | other (QUESTION_TYPE_RULES, in order)."""
    text = unicodedata.normalize("NFKC", str(text))
    for name, keywords in QUESTION_TYPE_RULES:
        if any(keyword in text for keyword in keywords):
            return name
    return "other"
