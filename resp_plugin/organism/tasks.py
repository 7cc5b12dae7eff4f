"""Procedural arithmetic word problems and a generic English corpus for the model organism.

Every problem has three renderings, one per RESP calibration kind:

- ``trace``: the model's own terse thinking format, ``<think> 7 + 5 = 12 12 - 3 = 9 </think> 9``
  ("self" traces are what the organism writes);
- ``gold``: a GSM8K-style explanation in full sentences ending in ``\\n#### N`` (human-written
  solutions, deliberately in another style than the model's own);
- the generic corpus (``generic_line``) is plain non-reasoning text, the C4 stand-in.

All numbers, intermediate ones included, stay in 0..200 so that each is one token of the
word-level tokenizer. The train/test split is a hash of the question text, so no question can be
in both splits, whatever seeds the generators use.

``python -m resp_plugin.organism.tasks --export`` rewrites ``resp_plugin/organism/data/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from resp_plugin.answers import THINK_CLOSE, THINK_OPEN
from resp_plugin.calibration.jsonl import write_jsonl

MAX_NUMBER = 200
TEST_FRACTION_MOD = 10  # a question is in the test split iff sha256(question) % 10 == 0
TEST_SEED = 20240
TRAIN_EXPORT_SEED = 11
GENERIC_EXPORT_SEED = 7
DATA_DIR = Path(__file__).parent / "data"

NAMES: dict[str, str] = {
    "Sam": "He", "Mia": "She", "Tom": "He", "Ava": "She", "Leo": "He", "Zoe": "She",
    "Ben": "He", "Lily": "She", "Max": "He", "Emma": "She", "Noah": "He", "Ruby": "She",
    "Jack": "He", "Nora": "She", "Omar": "He", "Ivy": "She",
}
OBJECTS: tuple[str, ...] = (
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "shells",
    "cards", "eggs", "balloons", "stamps", "crayons", "buttons", "candies", "toys",
)

# (question sentence, gold sentence) templates per operation. Slots: {name} {sub} {obj} {k} {a} {r}.
OPS: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("{sub} buys {k} more.", "After buying {k} more, {name} has {a} + {k} = {r} {obj}."),
        ("{sub} finds {k} more.", "{name} finds {k} more, so there are now {a} + {k} = {r} {obj}."),
        ("{sub} gets {k} more from a friend.", "A friend adds {k}, which makes {a} + {k} = {r} {obj}."),
        ("{name} wins {k} more {obj}.", "Winning {k} more gives {a} + {k} = {r} {obj}."),
    ),
    "sub": (
        ("{sub} gives away {k}.", "Giving away {k} leaves {a} - {k} = {r} {obj}."),
        ("{sub} loses {k} of them.", "{name} loses {k}, so {a} - {k} = {r} {obj} are left."),
        ("{sub} sells {k}.", "After selling {k}, {name} has {a} - {k} = {r} {obj}."),
        ("{name} uses {k} of the {obj}.", "Using {k} of them leaves {a} - {k} = {r} {obj}."),
    ),
    "mul2": (
        ("{sub} doubles the number of {obj}.", "Doubling the {obj} gives {a} * 2 = {r} {obj}."),
        ("The number of {obj} that {name} has doubles.", "Twice as many is {a} * 2 = {r} {obj}."),
    ),
    "mul3": (
        ("{sub} triples the number of {obj}.", "Tripling the {obj} gives {a} * 3 = {r} {obj}."),
        ("The number of {obj} that {name} has triples.", "Three times as many is {a} * 3 = {r} {obj}."),
    ),
    "half": (
        ("{sub} gives half of the {obj} to a friend.", "Half of {a} is {a} / 2 = {r}, so {name} keeps {r} {obj}."),
        ("{sub} puts half of the {obj} away.", "Putting half away leaves {a} / 2 = {r} {obj}."),
    ),
}
SYMBOL = {"add": "+", "sub": "-", "mul2": "*", "mul3": "*", "half": "/"}
STARTS: tuple[tuple[str, str], ...] = (
    ("{name} has {n} {obj}.", "{name} starts with {n} {obj}."),
    ("{name} starts the day with {n} {obj}.", "In the morning {name} has {n} {obj}."),
    ("{name} owns {n} {obj}.", "At first {name} owns {n} {obj}."),
)
QUESTIONS: tuple[str, ...] = (
    "How many {obj} does {name} have now?",
    "How many {obj} does {name} have at the end?",
)
ENDINGS: tuple[str, ...] = (
    "So {name} has {r} {obj} in the end.",
    "In total {name} ends up with {r} {obj}.",
)


@dataclass(frozen=True)
class Problem:
    """One word problem with its three renderings."""

    question: str
    gold: str
    trace: str
    answer: int
    steps: int

    def gsm8k(self) -> dict[str, str]:
        """The GSM8K field format (``question``, ``answer``), used for the exported jsonl files."""
        return {"question": self.question, "answer": self.gold}


def split_of(question: str) -> str:
    """``"test"`` or ``"train"``: a pure function of the text, so the splits can never overlap."""
    h = int(hashlib.sha256(question.encode()).hexdigest(), 16)
    return "test" if h % TEST_FRACTION_MOD == 0 else "train"


def _apply(op: str, a: int, k: int) -> int:
    return {"add": a + k, "sub": a - k, "mul2": a * 2, "mul3": a * 3, "half": a // 2}[op]


def _feasible_ops(a: int) -> list[str]:
    ops = ["add"] if a < MAX_NUMBER else []
    if a > 0:
        ops.append("sub")
    if 0 < a <= MAX_NUMBER // 2:
        ops.append("mul2")
    if 0 < a <= MAX_NUMBER // 3:
        ops.append("mul3")
    if a > 0 and a % 2 == 0:
        ops.append("half")
    return ops


def make_problem(rng: random.Random, steps: int | None = None) -> Problem:
    """Draw one problem; every intermediate number stays in 0..MAX_NUMBER."""
    steps = steps if steps is not None else rng.randint(1, 4)
    name = rng.choice(list(NAMES))
    sub_choices = (name, NAMES[name])
    obj = rng.choice(OBJECTS)
    a = rng.randint(1, 100)
    start_q, start_g = rng.choice(STARTS)
    q_parts = [start_q.format(name=name, n=a, obj=obj)]
    g_parts = [start_g.format(name=name, n=a, obj=obj)]
    t_parts = [THINK_OPEN]
    for _ in range(steps):
        op = rng.choice(_feasible_ops(a))
        if op == "add":
            k = rng.randint(1, min(50, MAX_NUMBER - a))
        elif op == "sub":
            k = rng.randint(1, min(50, a))
        else:
            k = {"mul2": 2, "mul3": 3, "half": 2}[op]
        r = _apply(op, a, k)
        tq, tg = rng.choice(OPS[op])
        slots = dict(name=name, sub=rng.choice(sub_choices), obj=obj, k=k, a=a, r=r)
        q_parts.append(tq.format(**slots))
        g_parts.append(tg.format(**slots))
        t_parts.append(f"{a} {SYMBOL[op]} {k} = {r}")
        a = r
    q_parts.append(rng.choice(QUESTIONS).format(name=name, obj=obj))
    g_parts.append(rng.choice(ENDINGS).format(name=name, r=a, obj=obj))
    t_parts.append(f"{THINK_CLOSE} {a}")
    gold = " ".join(g_parts) + f"\n#### {a}"
    return Problem(" ".join(q_parts), gold, " ".join(t_parts), a, steps)


def problems(split: str, seed: int):
    """Endless stream of problems of one split (``"train"`` or ``"test"``), deterministic by seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(seed)
    while True:
        p = make_problem(rng)
        if split_of(p.question) == split:
            yield p


def unique_problems(split: str, n: int, seed: int) -> list[Problem]:
    """The first ``n`` distinct questions of a split's stream."""
    seen: set[str] = set()
    out: list[Problem] = []
    for p in problems(split, seed):
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")


def held_out_problems(n: int = 500) -> list[Problem]:
    """The fixed held-out test set (the first ``n`` of the test stream)."""
    return unique_problems("test", n, TEST_SEED)


# ----------------------------------------------------------------------------- generic corpus
PLACES = ("the park", "the market", "the library", "the station", "the beach", "the farm",
          "the city", "the village", "the garden", "the school", "the river", "the forest",
          "the harbor", "the museum", "the bakery", "the hill")
WEATHER = ("sunny", "cloudy", "windy", "cold", "warm", "rainy", "foggy", "bright", "grey", "mild")
SEASONS = ("spring", "summer", "autumn", "winter")
ANIMALS = ("dog", "cat", "horse", "bird", "duck", "cow", "fox", "rabbit", "goat", "owl", "frog", "sheep")
ANIMAL_ACTS = ("sleeps", "runs", "waits", "sits", "plays", "rests", "hides", "eats")
THINGS = ("tree", "bench", "bridge", "fence", "table", "window", "wall", "boat", "lamp", "roof")
ADJ = ("old", "small", "quiet", "busy", "green", "tall", "long", "friendly", "little", "large")
ACTIVITIES = ("reads a book", "drinks tea", "cooks dinner", "cleans the kitchen", "writes a letter",
              "waters the plants", "listens to music", "paints a picture", "walks the dog",
              "visits a friend", "takes a nap", "rides a bike")
TIMES = ("in the morning", "after lunch", "in the evening", "at night", "on weekends", "every day")
FEELINGS = ("happy", "tired", "calm", "busy", "sleepy", "cheerful")

GENERIC_TEMPLATES: tuple[str, ...] = (
    "The weather in {place} is {weather} today.",
    "It is often {weather} in {place} during {season}.",
    "In {season} the days are {weather} and the nights are {weather2}.",
    "A {animal} {act} under the {adj} {thing}.",
    "The {adj} {animal} {act} near {place}.",
    "{name} {activity} {time}.",
    "{name} walks to {place} {time}.",
    "There is a {adj} {thing} next to {place}.",
    "{name} likes to see the {animal} at {place}.",
    "People meet at {place} when it is {weather}.",
    "The road to {place} passes a {adj} {thing}.",
    "{name} feels {feeling} {time}.",
    "After a {weather} day, {name} {activity}.",
    "The {animal} and the {animal2} live on the farm.",
    "Many visitors come to {place} in {season}.",
    "{name} and a friend go to {place} together.",
)


def generic_line(rng: random.Random) -> str:
    """One short paragraph (2-4 sentences) of plain English from the grammar above."""
    out = []
    for _ in range(rng.randint(2, 4)):
        t = rng.choice(GENERIC_TEMPLATES)
        out.append(t.format(
            place=rng.choice(PLACES), weather=rng.choice(WEATHER), weather2=rng.choice(WEATHER),
            season=rng.choice(SEASONS), animal=rng.choice(ANIMALS), animal2=rng.choice(ANIMALS),
            act=rng.choice(ANIMAL_ACTS), thing=rng.choice(THINGS), adj=rng.choice(ADJ),
            name=rng.choice(list(NAMES)), activity=rng.choice(ACTIVITIES), time=rng.choice(TIMES),
            feeling=rng.choice(FEELINGS),
        ))
    return " ".join(out)


def vocabulary_texts() -> list[str]:
    """Texts that contain every word the generators can emit (used to build the vocabulary)."""
    texts: list[str] = []
    for pool in (NAMES, NAMES.values(), OBJECTS, PLACES, WEATHER, SEASONS, ANIMALS, ANIMAL_ACTS,
                 THINGS, ADJ, ACTIVITIES, TIMES, FEELINGS, QUESTIONS, ENDINGS, GENERIC_TEMPLATES):
        texts.extend(pool)
    for pair in [*STARTS, *(t for ts in OPS.values() for t in ts)]:
        texts.extend(pair)
    texts.extend(SYMBOL.values())
    texts.append("#### user assistant system")
    return texts


# ----------------------------------------------------------------------------- export
def export(out_dir: Path = DATA_DIR, n_test: int = 500, n_train: int = 2000, n_generic: int = 400) -> Path:
    """Write ``test.jsonl``, ``train.jsonl`` (GSM8K format) and ``generic.txt`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, probs in (("test.jsonl", held_out_problems(n_test)),
                        ("train.jsonl", unique_problems("train", n_train, TRAIN_EXPORT_SEED))):
        write_jsonl(out_dir / name, (p.gsm8k() for p in probs))
    rng = random.Random(GENERIC_EXPORT_SEED)
    lines: list[str] = []
    seen: set[str] = set()
    while len(lines) < n_generic:
        line = generic_line(rng)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    (out_dir / "generic.txt").write_text("\n".join(lines) + "\n")
    logger.info(f"exported {n_test} test, {n_train} train problems and {n_generic} generic lines to {out_dir}")
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", action="store_true", help="rewrite the exported data files")
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    ap.add_argument("--show", type=int, default=0, help="print this many sample problems")
    args = ap.parse_args()
    if args.export:
        print(export(args.out))
    rng = random.Random(0)
    for _ in range(args.show):
        print(json.dumps(asdict(make_problem(rng)), indent=1))


if __name__ == "__main__":
    main()
