"""Builds the bundled demo assets: the demo SFT dataset and the MiniMind2-format tokenizer trained on it.

    python scripts/build_demo_assets.py [--out minimind_train/assets]

regenerates ``demo/sft_demo.jsonl`` and ``tokenizer/`` under the assets folder, byte for byte. Every
answer of the dataset follows from its question by a fixed rule (arithmetic, a small lookup table, a
string operation), so a 0.5-9M-parameter model can learn it well enough on a CPU in minutes that the
learning rate and the other hyperparameters visibly move the validation loss. Held-out conversations
are new combinations (operands, countries, phrasings, follow-ups) of patterns the training split has seen.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_SEED",
    "DEMO_SIZE",
    "build_assets",
    "en_number",
    "generate_demo_conversations",
    "main",
    "tokenizer_corpus",
    "train_tokenizer",
    "write_jsonl",
    "zh_number",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# The package's assets folder: minimind_train.data.DEMO_DATA_PATH is <assets>/demo/sft_demo.jsonl.
ASSETS_DIR = REPO / "minimind_train" / "assets"
DEMO_FILE = Path("demo") / "sft_demo.jsonl"
DEMO_SIZE = 3000
DEMO_SEED = 0
# In id order: pad/unk, bos, eos (minimind_train.tokenizer.SPECIAL_TOKENS, whose loader checks them).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A question template and the answer template that goes with it; ``{name}`` fields are filled from
# the exchange's values.
Phrasing = tuple[str, str]

# ---------------------------------------------------------------------------------------------------
# Fixed tables. Tuples, not sets or dicts, so iteration order never depends on PYTHONHASHSEED.

_EN_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
            "nineteen")
_EN_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ZH_DIGITS = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九")

# (country, 国家, capital, 首都)
_COUNTRIES: tuple[tuple[str, str, str, str], ...] = (
    ("France", "法国", "Paris", "巴黎"),
    ("Germany", "德国", "Berlin", "柏林"),
    ("Japan", "日本", "Tokyo", "东京"),
    ("China", "中国", "Beijing", "北京"),
    ("Italy", "意大利", "Rome", "罗马"),
    ("Spain", "西班牙", "Madrid", "马德里"),
    ("Russia", "俄罗斯", "Moscow", "莫斯科"),
    ("Egypt", "埃及", "Cairo", "开罗"),
    ("Canada", "加拿大", "Ottawa", "渥太华"),
    ("Australia", "澳大利亚", "Canberra", "堪培拉"),
    ("Brazil", "巴西", "Brasilia", "巴西利亚"),
    ("India", "印度", "New Delhi", "新德里"),
    ("Britain", "英国", "London", "伦敦"),
    ("South Korea", "韩国", "Seoul", "首尔"),
    ("Thailand", "泰国", "Bangkok", "曼谷"),
    ("Greece", "希腊", "Athens", "雅典"),
    ("Portugal", "葡萄牙", "Lisbon", "里斯本"),
    ("Sweden", "瑞典", "Stockholm", "斯德哥尔摩"),
    ("Norway", "挪威", "Oslo", "奥斯陆"),
    ("Kenya", "肯尼亚", "Nairobi", "内罗毕"),
    ("Turkey", "土耳其", "Ankara", "安卡拉"),
    ("Vietnam", "越南", "Hanoi", "河内"),
    ("Ireland", "爱尔兰", "Dublin", "都柏林"),
    ("Poland", "波兰", "Warsaw", "华沙"),
    ("Austria", "奥地利", "Vienna", "维也纳"),
    ("Peru", "秘鲁", "Lima", "利马"),
    ("Cuba", "古巴", "Havana", "哈瓦那"),
    ("Finland", "芬兰", "Helsinki", "赫尔辛基"),
)

_WEEKDAYS: tuple[tuple[str, str], ...] = (
    ("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"),
    ("Friday", "星期五"), ("Saturday", "星期六"), ("Sunday", "星期日"),
)

_MONTHS: tuple[tuple[str, str], ...] = (
    ("January", "一月"), ("February", "二月"), ("March", "三月"), ("April", "四月"), ("May", "五月"),
    ("June", "六月"), ("July", "七月"), ("August", "八月"), ("September", "九月"),
    ("October", "十月"), ("November", "十一月"), ("December", "十二月"),
)

# (object with article as it starts a sentence, 物体, colour, 颜色)
_OBJECT_COLORS: tuple[tuple[str, str, str, str], ...] = (
    ("the sky", "天空", "blue", "蓝色"),
    ("the sea", "大海", "blue", "蓝色"),
    ("grass", "草", "green", "绿色"),
    ("a frog", "青蛙", "green", "绿色"),
    ("a cucumber", "黄瓜", "green", "绿色"),
    ("a banana", "香蕉", "yellow", "黄色"),
    ("a lemon", "柠檬", "yellow", "黄色"),
    ("snow", "雪", "white", "白色"),
    ("milk", "牛奶", "white", "白色"),
    ("a polar bear", "北极熊", "white", "白色"),
    ("coal", "煤", "black", "黑色"),
    ("a crow", "乌鸦", "black", "黑色"),
    ("a tomato", "西红柿", "red", "红色"),
    ("a strawberry", "草莓", "red", "红色"),
    ("a cherry", "樱桃", "red", "红色"),
    ("a carrot", "胡萝卜", "orange", "橙色"),
    ("a pumpkin", "南瓜", "orange", "橙色"),
    ("chocolate", "巧克力", "brown", "棕色"),
    ("coffee", "咖啡", "brown", "棕色"),
    ("an eggplant", "茄子", "purple", "紫色"),
)

_WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "cup", "pen", "map", "box", "egg", "hat", "bus",
    "book", "tree", "fish", "bird", "star", "moon", "milk", "rain", "lamp", "door",
    "cake", "frog", "ship", "rose", "hand", "road", "king", "snow", "wind", "gold",
    "apple", "house", "water", "green", "table", "river", "cloud", "piano", "tiger", "horse",
    "chair", "lemon", "bread", "music", "light", "plant", "stone", "smile", "dream", "train",
    "garden", "window", "orange", "rabbit", "pencil", "silver", "winter", "summer", "flower", "doctor",
)

# (singular, plural, 单位) for "from" and "to", and how many "to" make one "from".
_UNITS: tuple[tuple[tuple[str, str, str], tuple[str, str, str], int], ...] = (
    (("meter", "meters", "米"), ("centimeter", "centimeters", "厘米"), 100),
    (("kilometer", "kilometers", "千米"), ("meter", "meters", "米"), 1000),
    (("kilogram", "kilograms", "千克"), ("gram", "grams", "克"), 1000),
    (("hour", "hours", "小时"), ("minute", "minutes", "分钟"), 60),
    (("minute", "minutes", "分钟"), ("second", "seconds", "秒"), 60),
    (("day", "days", "天"), ("hour", "hours", "小时"), 24),
    (("week", "weeks", "周"), ("day", "days", "天"), 7),
    (("year", "years", "年"), ("month", "months", "个月"), 12),
)

# (system prompt, the language it asks answers in or None for the question's language)
_SYSTEM_PROMPTS: tuple[tuple[str, str | None], ...] = (
    ("Always answer in English.", "en"),
    ("Answer in Chinese.", "zh"),
    ("请用中文回答。", "zh"),
    ("请用英文回答。", "en"),
    ("You are a helpful assistant.", None),
    ("你是一个乐于助人的助手。", None),
    ("You are a concise assistant. Keep answers short.", None),
)


def en_number(n: int) -> str:
    """English words for 0 <= n <= 99 (``forty-two``)."""
    if n < 20:
        return _EN_ONES[n]
    tens, ones = divmod(n, 10)
    return _EN_TENS[tens] + ("" if ones == 0 else "-" + _EN_ONES[ones])


def zh_number(n: int) -> str:
    """Chinese numerals for 0 <= n <= 9999 (``四十二``, ``一千零五``)."""
    if n < 10:
        return _ZH_DIGITS[n]
    if n < 20:
        return "十" + ("" if n == 10 else _ZH_DIGITS[n - 10])
    out = ""
    zero_pending = False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = (n // value) % 10
        if digit == 0:
            zero_pending = bool(out)
            continue
        if zero_pending:
            out += "零"
            zero_pending = False
        out += _ZH_DIGITS[digit] + unit
    return out


# ---------------------------------------------------------------------------------------------------
# Exchanges: one question/answer pair in both languages, optionally with dependent follow-ups.


@dataclass(frozen=True)
class _Exchange:
    phrasings: Mapping[str, Sequence[Phrasing]]
    values: Mapping[str, object]
    # Builders of a next question that refers back to this one ("And doubled?").
    follow_ups: Sequence[Callable[[random.Random], _Exchange]] = field(default_factory=tuple)

    def render(self, q_lang: str, a_lang: str, rng: random.Random) -> tuple[str, str]:
        """The question in ``q_lang`` and its answer in ``a_lang``."""
        options = self.phrasings[q_lang]
        i = rng.randrange(len(options))
        question = options[i][0]
        # Across languages the answer uses the first (canonical) phrasing of the answer language.
        answer = options[i][1] if a_lang == q_lang else self.phrasings[a_lang][0][1]
        return question.format(**self.values), answer.format(**self.values)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _add(rng: random.Random) -> _Exchange:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    return _sum_exchange(a, b, a + b)


def _sum_exchange(a: int, b: int, c: int) -> _Exchange:
    return _Exchange(
        {
            "en": (("What is {a} plus {b}?", "{a} plus {b} is {c}."),
                   ("What is {a} + {b}?", "{a} + {b} = {c}."),
                   ("Calculate {a} + {b}.", "{a} + {b} = {c}."),
                   ("Add {a} and {b}.", "{a} + {b} = {c}."),
                   ("What do you get if you add {a} and {b}?", "Adding {a} and {b} gives {c}.")),
            "zh": (("{a}加{b}等于多少？", "{a}加{b}等于{c}。"),
                   ("计算{a}+{b}。", "{a}+{b}={c}。"),
                   ("{a}和{b}的和是多少？", "{a}和{b}的和是{c}。"),
                   ("请算一下{a}加{b}。", "{a}加{b}等于{c}。")),
        },
        {"a": a, "b": b, "c": c},
        (lambda rng: _plus_more(c, rng), lambda rng: _doubled(c)),
    )


def _sub(rng: random.Random) -> _Exchange:
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    c = a - b
    return _Exchange(
        {
            "en": (("What is {a} minus {b}?", "{a} minus {b} is {c}."),
                   ("What is {a} - {b}?", "{a} - {b} = {c}."),
                   ("Calculate {a} - {b}.", "{a} - {b} = {c}."),
                   ("Subtract {b} from {a}.", "{a} - {b} = {c}.")),
            "zh": (("{a}减{b}等于多少？", "{a}减{b}等于{c}。"),
                   ("计算{a}-{b}。", "{a}-{b}={c}。"),
                   ("{a}减去{b}是多少？", "{a}减去{b}是{c}。")),
        },
        {"a": a, "b": b, "c": c},
        (lambda rng: _plus_more(c, rng), lambda rng: _doubled(c)),
    )


def _plus_more(c: int, rng: random.Random) -> _Exchange:
    k = rng.randint(1, 9)
    d = c + k
    return _Exchange(
        {
            "en": (("And if you add {k} more?", "{c} + {k} = {d}."),
                   ("Now add {k} to that.", "{c} + {k} = {d}.")),
            "zh": (("再加{k}呢？", "{c}加{k}等于{d}。"),
                   ("结果再加上{k}是多少？", "{c}加上{k}是{d}。")),
        },
        {"c": c, "k": k, "d": d},
        (lambda rng: _doubled(d),),
    )


def _doubled(c: int) -> _Exchange:
    d = 2 * c
    return _Exchange(
        {
            "en": (("And doubled?", "{c} doubled is {d}."),
                   ("What is twice that?", "Twice {c} is {d}.")),
            "zh": (("再乘以2呢？", "{c}乘以2等于{d}。"),
                   ("结果的两倍是多少？", "{c}的两倍是{d}。")),
        },
        {"c": c, "d": d},
        (lambda rng: _plus_more(d, rng),),
    )


def _compare(rng: random.Random) -> _Exchange:
    a, b = rng.sample(range(100), 2)
    larger = rng.random() < 0.5
    return _Exchange(
        {
            "en": ((("Which is larger, {a} or {b}?", "{m} is larger.") if larger else
                    ("Which is smaller, {a} or {b}?", "{m} is smaller.")),
                   (("Which number is bigger: {a} or {b}?", "The bigger number is {m}.") if larger else
                    ("Which number is less: {a} or {b}?", "The smaller number is {m}."))),
            "zh": ((("{a}和{b}哪个大？", "{m}更大。") if larger else ("{a}和{b}哪个小？", "{m}更小。")),
                   (("{a}和{b}中较大的数是哪个？", "较大的数是{m}。") if larger else
                    ("{a}和{b}中较小的数是哪个？", "较小的数是{m}。"))),
        },
        {"a": a, "b": b, "m": max(a, b) if larger else min(a, b)},
    )


def _capital(rng: random.Random, exclude: int = -1) -> _Exchange:
    i = rng.choice([j for j in range(len(_COUNTRIES)) if j != exclude])
    en, zh, cap_en, cap_zh = _COUNTRIES[i]
    return _Exchange(
        {
            "en": (("What is the capital of {en}?", "The capital of {en} is {cap_en}."),
                   ("Name the capital city of {en}.", "The capital city of {en} is {cap_en}."),
                   ("Which city is the capital of {en}?", "{cap_en} is the capital of {en}.")),
            "zh": (("{zh}的首都是哪里？", "{zh}的首都是{cap_zh}。"),
                   ("请问{zh}的首都是哪个城市？", "{zh}的首都是{cap_zh}。"),
                   ("哪个城市是{zh}的首都？", "{cap_zh}是{zh}的首都。")),
        },
        {"en": en, "zh": zh, "cap_en": cap_en, "cap_zh": cap_zh},
        (lambda rng: _capital_again(rng, i),),
    )


def _capital_again(rng: random.Random, previous: int) -> _Exchange:
    nxt = _capital(rng, exclude=previous)
    return _Exchange(
        {
            "en": (("And {en}?", "The capital of {en} is {cap_en}."),
                   ("What about {en}?", "The capital of {en} is {cap_en}.")),
            "zh": (("那{zh}呢？", "{zh}的首都是{cap_zh}。"),
                   ("{zh}呢？", "{zh}的首都是{cap_zh}。")),
        },
        nxt.values,
        nxt.follow_ups,
    )


def _cyclic(table: Sequence[tuple[str, str]], kind: str, i: int, step: int) -> _Exchange:
    """Next (``step`` = 1) or previous (-1) weekday or month."""
    en, zh = table[i]
    other_en, other_zh = table[(i + step) % len(table)]
    values = {"x_en": en, "x_zh": zh, "y_en": other_en, "y_zh": other_zh}
    if kind == "day":
        after = step == 1
        word, zh_word = ("after", "后一天") if after else ("before", "前一天")
        phrasings = {
            "en": ((f"What day comes {word} {{x_en}}?", f"The day {word} {{x_en}} is {{y_en}}."),
                   (f"Which day of the week is {word} {{x_en}}?", f"{{y_en}} comes {word} {{x_en}}.")),
            "zh": ((f"{{x_zh}}的{zh_word}是星期几？", f"{{x_zh}}的{zh_word}是{{y_zh}}。"),
                   (f"{{x_zh}}的{zh_word}是哪天？", "是{y_zh}。")),
        }
    else:
        after = step == 1
        word, zh_word = ("after", "下一个月") if after else ("before", "上一个月")
        phrasings = {
            "en": ((f"What month comes {word} {{x_en}}?", f"The month {word} {{x_en}} is {{y_en}}."),
                   (f"Which month is {word} {{x_en}}?", f"{{y_en}} comes {word} {{x_en}}.")),
            "zh": ((f"{{x_zh}}的{zh_word}是几月？", f"{{x_zh}}的{zh_word}是{{y_zh}}。"),
                   (f"{{x_zh}}的{zh_word}是哪个月？", "是{y_zh}。")),
        }
    j = (i + step) % len(table)
    return _Exchange(phrasings, values, (lambda rng: _cyclic_again(table, kind, j, step),))


def _cyclic_again(table: Sequence[tuple[str, str]], kind: str, i: int, step: int) -> _Exchange:
    en, zh = table[i]
    other_en, other_zh = table[(i + step) % len(table)]
    after = step == 1
    if kind == "day":
        en_q = "And the day after that?" if after else "And the day before that?"
        en_a = "The day after {x_en} is {y_en}." if after else "The day before {x_en} is {y_en}."
        zh_q = "再后一天呢？" if after else "再前一天呢？"
        zh_a = "{x_zh}的后一天是{y_zh}。" if after else "{x_zh}的前一天是{y_zh}。"
    else:
        en_q = "And the month after that?" if after else "And the month before that?"
        en_a = "The month after {x_en} is {y_en}." if after else "The month before {x_en} is {y_en}."
        zh_q = "再下一个月呢？" if after else "再上一个月呢？"
        zh_a = "{x_zh}的下一个月是{y_zh}。" if after else "{x_zh}的上一个月是{y_zh}。"
    j = (i + step) % len(table)
    return _Exchange(
        {"en": ((en_q, en_a),), "zh": ((zh_q, zh_a),)},
        {"x_en": en, "x_zh": zh, "y_en": other_en, "y_zh": other_zh},
        (lambda rng: _cyclic_again(table, kind, j, step),),
    )


def _weekday(rng: random.Random) -> _Exchange:
    return _cyclic(_WEEKDAYS, "day", rng.randrange(len(_WEEKDAYS)), rng.choice((1, 1, -1)))


def _month(rng: random.Random) -> _Exchange:
    return _cyclic(_MONTHS, "month", rng.randrange(len(_MONTHS)), rng.choice((1, 1, -1)))


def _color(rng: random.Random, exclude: int = -1, follow: bool = False) -> _Exchange:
    i = rng.choice([j for j in range(len(_OBJECT_COLORS)) if j != exclude])
    obj, obj_zh, color, color_zh = _OBJECT_COLORS[i]
    values = {"obj": obj, "Obj": _cap(obj), "obj_zh": obj_zh, "color": color, "color_zh": color_zh}
    if follow:
        phrasings: Mapping[str, Sequence[Phrasing]] = {
            "en": (("And {obj}?", "{Obj} is {color}."), ("What about {obj}?", "{Obj} is {color}.")),
            "zh": (("那{obj_zh}呢？", "{obj_zh}是{color_zh}的。"), ("{obj_zh}呢？", "{obj_zh}是{color_zh}的。")),
        }
    else:
        phrasings = {
            "en": (("What color is {obj}?", "{Obj} is {color}."),
                   ("What is the color of {obj}?", "The color of {obj} is {color}."),
                   ("Tell me the color of {obj}.", "{Obj} is {color}.")),
            "zh": (("{obj_zh}是什么颜色的？", "{obj_zh}是{color_zh}的。"),
                   ("{obj_zh}通常是什么颜色？", "{obj_zh}通常是{color_zh}。"),
                   ("请告诉我{obj_zh}的颜色。", "{obj_zh}的颜色是{color_zh}。")),
        }
    return _Exchange(phrasings, values, (lambda rng: _color(rng, exclude=i, follow=True),))


def _word_op(rng: random.Random, op: str = "", word: str = "", follow: bool = False) -> _Exchange:
    word = word or rng.choice(_WORDS)
    op = op or rng.choice(("reverse", "upper", "count", "first"))
    values = {"w": word, "rev": word[::-1], "up": word.upper(), "n": len(word), "f": word[0]}
    if follow:
        # The follow-up asks for another operation on the same word ("it").
        table: Mapping[str, Mapping[str, Sequence[Phrasing]]] = {
            "reverse": {"en": (("Now write it backwards.", "\"{w}\" backwards is \"{rev}\"."),),
                        "zh": (("再把它倒过来写。", "{w} 倒过来写是 {rev}。"),)},
            "upper": {"en": (("Now write it in capital letters.", "In capital letters, \"{w}\" is \"{up}\"."),),
                      "zh": (("再把它写成大写。", "{w} 的大写是 {up}。"),)},
            "count": {"en": (("How many letters does it have?", "\"{w}\" has {n} letters."),),
                      "zh": (("它有几个字母？", "{w} 有{n}个字母。"),)},
            "first": {"en": (("What is its first letter?", "The first letter of \"{w}\" is \"{f}\"."),),
                      "zh": (("它的第一个字母是什么？", "{w} 的第一个字母是 {f}。"),)},
        }
    else:
        table = {
            "reverse": {"en": (("Reverse the word \"{w}\".", "\"{w}\" backwards is \"{rev}\"."),
                               ("Spell \"{w}\" backwards.", "\"{w}\" spelled backwards is \"{rev}\"."),
                               ("Write \"{w}\" in reverse order.", "\"{w}\" backwards is \"{rev}\".")),
                        "zh": (("把单词 {w} 倒过来写。", "{w} 倒过来写是 {rev}。"),
                               ("请把 {w} 反过来拼写。", "{w} 反过来是 {rev}。"))},
            "upper": {"en": (("Write \"{w}\" in capital letters.", "In capital letters, \"{w}\" is \"{up}\"."),
                             ("Convert \"{w}\" to uppercase.", "\"{w}\" in uppercase is \"{up}\".")),
                      "zh": (("把单词 {w} 写成大写。", "{w} 的大写是 {up}。"),
                             ("请把 {w} 转换成大写字母。", "{w} 转换成大写是 {up}。"))},
            "count": {"en": (("How many letters are in the word \"{w}\"?", "\"{w}\" has {n} letters."),
                             ("Count the letters in \"{w}\".", "There are {n} letters in \"{w}\".")),
                      "zh": (("单词 {w} 有几个字母？", "{w} 有{n}个字母。"),
                             ("数一数 {w} 有多少个字母。", "{w} 一共有{n}个字母。"))},
            "first": {"en": (("What is the first letter of \"{w}\"?", "The first letter of \"{w}\" is \"{f}\"."),
                             ("Which letter does \"{w}\" start with?", "\"{w}\" starts with \"{f}\".")),
                      "zh": (("单词 {w} 的第一个字母是什么？", "{w} 的第一个字母是 {f}。"),
                             ("{w} 以哪个字母开头？", "{w} 以字母 {f} 开头。"))},
        }
    phrasings = table[op]
    others = tuple(o for o in ("reverse", "upper", "count", "first") if o != op)
    return _Exchange(phrasings, values,
                     (lambda rng: _word_op(rng, op=rng.choice(others), word=word, follow=True),))


def _translate(rng: random.Random, to_zh: bool | None = None, follow: bool = False) -> _Exchange:
    n = rng.randint(1, 20)
    to_zh = rng.random() < 0.5 if to_zh is None else to_zh
    values = {"n": n, "n_en": en_number(n), "n_zh": zh_number(n)}
    if to_zh:
        phrasings: Mapping[str, Sequence[Phrasing]] = {
            "en": (("How do you say \"{n_en}\" in Chinese?", "\"{n_en}\" in Chinese is {n_zh}."),
                   ("Translate \"{n_en}\" into Chinese.", "\"{n_en}\" in Chinese is {n_zh}.")),
            "zh": (("“{n_en}”用中文怎么说？", "“{n_en}”的中文是{n_zh}。"),
                   ("把英文 {n_en} 翻译成中文。", "{n_en} 翻译成中文是{n_zh}。")),
        }
        if follow:
            phrasings = {"en": (("And \"{n_en}\"?", "\"{n_en}\" in Chinese is {n_zh}."),),
                         "zh": (("那“{n_en}”呢？", "“{n_en}”的中文是{n_zh}。"),)}
    else:
        phrasings = {
            "en": (("What does {n_zh} mean in English?", "{n_zh} means {n_en} in English."),
                   ("Translate {n_zh} into English.", "{n_zh} in English is {n_en}.")),
            "zh": (("“{n_zh}”用英语怎么说？", "“{n_zh}”的英文是 {n_en}。"),
                   ("把{n_zh}翻译成英文。", "{n_zh}翻译成英文是 {n_en}。")),
        }
        if follow:
            phrasings = {"en": (("And {n_zh}?", "{n_zh} means {n_en} in English."),),
                         "zh": (("那“{n_zh}”呢？", "“{n_zh}”的英文是 {n_en}。"),)}
    return _Exchange(phrasings, values, (lambda rng: _translate(rng, to_zh=to_zh, follow=True),))


def _in_words(rng: random.Random) -> _Exchange:
    n = rng.randint(0, 99)
    return _Exchange(
        {
            "en": (("Write {n} in words.", "{n} in words is {n_en}."),
                   ("How do you spell the number {n}?", "The number {n} is spelled {n_en}.")),
            "zh": (("用汉字写出数字{n}。", "{n}写作{n_zh}。"),
                   ("数字{n}的中文写法是什么？", "{n}的中文写法是{n_zh}。")),
        },
        {"n": n, "n_en": en_number(n), "n_zh": zh_number(n)},
    )


def _convert(rng: random.Random, unit: int = -1, follow: bool = False) -> _Exchange:
    unit = rng.randrange(len(_UNITS)) if unit < 0 else unit
    (src_1, src_n, src_zh), (_, dst_n, dst_zh), factor = _UNITS[unit]
    v = rng.randint(1, 9)
    values = {"v": v, "src": src_1 if v == 1 else src_n, "dst": dst_n, "src_zh": src_zh,
              "dst_zh": dst_zh, "r": v * factor}
    if follow:
        phrasings: Mapping[str, Sequence[Phrasing]] = {
            "en": (("And {v} {src}?", "{v} {src} is {r} {dst}."),),
            "zh": (("那{v}{src_zh}呢？", "{v}{src_zh}等于{r}{dst_zh}。"),),
        }
    else:
        phrasings = {
            "en": (("How many {dst} are in {v} {src}?", "{v} {src} is {r} {dst}."),
                   ("Convert {v} {src} to {dst}.", "{v} {src} equals {r} {dst}.")),
            "zh": (("{v}{src_zh}等于多少{dst_zh}？", "{v}{src_zh}等于{r}{dst_zh}。"),
                   ("把{v}{src_zh}换算成{dst_zh}。", "{v}{src_zh}是{r}{dst_zh}。")),
        }
    return _Exchange(phrasings, values, (lambda rng: _convert(rng, unit=unit, follow=True),))


def _chat(rng: random.Random) -> _Exchange:
    kind = rng.randrange(3)
    phrasings: Mapping[str, Sequence[Phrasing]] = (
        {"en": (("Hello!", "Hello! How can I help you today?"),
                ("Hi there!", "Hi! How can I help you today?")),
         "zh": (("你好！", "你好！有什么可以帮你的吗？"),
                ("您好！", "您好！请问有什么可以帮您？"))},
        {"en": (("Who are you?", "I am MiniMind, a small language model."),
                ("What is your name?", "My name is MiniMind.")),
         "zh": (("你是谁？", "我是 MiniMind，一个小型语言模型。"),
                ("你叫什么名字？", "我叫 MiniMind。"))},
        {"en": (("Thank you!", "You are welcome!"),
                ("Thanks for your help.", "You are welcome. Happy to help!")),
         "zh": (("谢谢！", "不客气！"),
                ("谢谢你的帮助。", "不客气，很高兴能帮到你！"))},
    )[kind]
    return _Exchange(phrasings, {})


# (builder, weight): weights keep each rule frequent enough to be learned from ~2,700 samples.
_TASKS: tuple[tuple[Callable[[random.Random], _Exchange], int], ...] = (
    (_add, 12), (_sub, 8), (_compare, 6), (_capital, 12), (_weekday, 7), (_month, 6), (_color, 9),
    (_word_op, 12), (_translate, 9), (_in_words, 7), (_convert, 8), (_chat, 4),
)


def _new_exchange(rng: random.Random) -> _Exchange:
    builders = [b for b, _ in _TASKS]
    weights = [w for _, w in _TASKS]
    return rng.choices(builders, weights=weights)[0](rng)


def _conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    lang = rng.choice(("en", "zh"))
    answer_lang = lang
    messages: list[dict[str, str]] = []
    if rng.random() < 0.12:
        prompt, forced = rng.choice(_SYSTEM_PROMPTS)
        messages.append({"role": "system", "content": prompt})
        answer_lang = forced or lang
    rounds = rng.choices((1, 2, 3), weights=(40, 35, 25))[0]
    exchange = _new_exchange(rng)
    for turn in range(rounds):
        question, answer = exchange.render(lang, answer_lang, rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
        if turn + 1 < rounds:
            if exchange.follow_ups and rng.random() < 0.6:
                exchange = rng.choice(list(exchange.follow_ups))(rng)
            else:
                exchange = _new_exchange(rng)
    return {"conversations": messages}


def generate_demo_conversations(n: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` conversations in MiniMind's SFT format; the same ``(n, seed)`` always gives the same list."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(seed)
    return [_conversation(rng) for _ in range(n)]


def write_jsonl(conversations: Iterable[Mapping[str, object]], path: str | Path) -> None:
    """One JSON object per line, UTF-8 without escapes, ``\\n`` line ends (byte-stable across OSes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# The tokenizer: its corpus, MiniMind2's tokenizer files, the trainer; the asset builder.


def tokenizer_corpus(conversations: Sequence[Mapping[str, Sequence[Mapping[str, str]]]]) -> Iterator[str]:
    """Texts to train the bundled tokenizer on: the demo data, more of its kind, and bare vocabulary.

    Each conversation is laid out as the chat template lays it out (role names, newlines, the default
    system prompt) but without the special tokens, which the trainer adds itself.
    """
    for conversation in conversations:
        messages = conversation["conversations"]
        parts = [] if messages and messages[0]["role"] == "system" else ["system\nYou are a helpful assistant"]
        parts += [f"{m['role']}\n{m['content']}" for m in messages]
        yield "\n".join(parts)
    # Vocabulary in isolation, so names and numbers become tokens of their own and not only as
    # fragments of the sentences they happen to appear in.
    yield " ".join(en_number(n) for n in range(100))
    yield "，".join(zh_number(n) for n in range(10000))
    # Numbers up to 9999 take vocabulary that would otherwise go to whole template sentences.
    yield " ".join(str(n) for n in range(10000))
    for row in _COUNTRIES:
        yield "，".join(row)
    for pair in (*_WEEKDAYS, *_MONTHS):
        yield "，".join(pair)
    for row in _OBJECT_COLORS:
        yield "，".join(row)
    yield " ".join(_WORDS) + "\n" + " ".join(w.upper() for w in _WORDS)
    for prompt, _ in _SYSTEM_PROMPTS:
        yield prompt


# MiniMind2's template verbatim: ChatML, with a default system prompt when the first message is not
# a system message, and the assistant prefix rendered after every user turn.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
)


def _tokenizer_config() -> dict[str, object]:
    """MiniMind2's tokenizer_config.json, field for field."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, token in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": [],
        "bos_token": SPECIAL_TOKENS[1],
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL_TOKENS[2],
        "legacy": True,
        "model_max_length": 32768,
        "pad_token": SPECIAL_TOKENS[0],
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": SPECIAL_TOKENS[0],
        "chat_template": CHAT_TEMPLATE,
    }




def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 6400) -> None:
    """Train a MiniMind2-format byte-level BPE on ``texts`` and write it to ``out_dir``.

    Trained from an iterator: the ``tokenizers`` file reader aborts the process on non-UTF-8 input.
    The vocabulary may come out smaller than ``vocab_size`` when the texts support fewer merges.
    """
    # Imported here so that generating the dataset needs only the standard library.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens "
                         "plus the 256-byte alphabet")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        # All 256 bytes, seen or not, so any text round-trips and nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.decoder = decoders.ByteLevel()
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"trainer gave {token} id {tokenizer.token_to_id(token)}, expected {expected_id}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    (out / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8", newline="\n")


def build_assets(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``demo/sft_demo.jsonl`` and ``tokenizer/`` under ``out_dir``; return both paths."""
    out_dir = Path(out_dir)
    conversations = generate_demo_conversations(DEMO_SIZE, DEMO_SEED)
    data_path = out_dir / DEMO_FILE
    write_jsonl(conversations, data_path)
    tokenizer_dir = out_dir / "tokenizer"
    train_tokenizer(tokenizer_corpus(conversations), tokenizer_dir)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    log.info("%d conversations in %s; tokenizer with %d tokens in %s",
             len(conversations), data_path, vocab, tokenizer_dir)
    return data_path, tokenizer_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python scripts/build_demo_assets.py",
        description="Regenerate the bundled demo SFT dataset and the tokenizer trained on it.")
    parser.add_argument("--out", default=str(ASSETS_DIR),
                        help="assets folder to write demo/ and tokenizer/ into (default: the package's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_path, tokenizer_dir = build_assets(args.out)
    print(f"wrote {data_path} and {tokenizer_dir}")


if __name__ == "__main__":
    main()
