"""Offline generator of RULER-style long-context accuracy tasks.

Every sample is a raw-text prompt (no chat template) of about `length` tokens, for the
tokenizer it was fitted to, that ends with an answer prefix, so that a base or an instruct
model continues with the answer. The tasks:

* `passkey`: a 5-digit pass key hidden in repeated noise sentences ("The grass is green.
  The sky is blue. ...").
* `niah_single_1`: one "special magic number" (7 digits) for a key word, in the same noise.
* `niah_multikey_2`: the haystack is made of distractor needles, magic numbers for other
  (distinct) keys; the target needle sits among them.
* `niah_multikey_3`: the same with uuid keys and uuid values.
* `vt`: variable tracking, one chain of 4 hops ("VAR A = 12345", "VAR B = VAR A", ...,
  5 variables) spread through the noise; the answer is the 5 variable names.

The needle goes after `round(depth * n_units)` haystack units (noise sentences or
distractor needles); the amount of haystack is fitted with a few tokenizer calls (an
estimate, then a binary search) so that the prompt has at most `length - 8` tokens and
is as close to that as one haystack unit allows.

Metric (RULER's `string_match_all`): the fraction of the expected strings that occur in
the model's output, case-insensitively; a task's score is its mean over samples.

Pure Python: all randomness comes from `random.Random(seed)`, nothing is downloaded or
read, and neither vLLM nor torch is imported. The tokenizer is any object with a Hugging
Face-like `encode(text, add_special_tokens=False) -> list[int]`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

__all__ = [
    "MAX_NEW_TOKENS",
    "TASKS",
    "Sample",
    "make_sample",
    "make_samples",
    "string_match_all",
]

TASKS = ("passkey", "niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt")

# Greedy output budget per task: the answer plus a little slack.
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 12,
    "niah_single_1": 16,
    "niah_multikey_2": 16,
    "niah_multikey_3": 40,
    # SmolLM2-135M answers vt as a list ("A) VAR XXXXX" per line, ~8 tokens a name): 40
    # tokens cut the fifth name
    "vt": 64,
}

# Prompts leave this many tokens of the target length free (BOS and other specials).
HEADROOM_TOKENS = 8

_NOISE = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

# Keys for the magic-number tasks: common English nouns and adjectives, lowercase, none a
# substring of another and none a word of the noise sentences or of the templates.
_WORDS = tuple("""
    ability absent account acid actor adult advice agency airport album alley almond anchor
    angle animal ankle anthem apple apron arch arena armor arrow artist autumn avenue
    badge bakery balcony ballet bamboo banana banner barrel basket battery beach beard
    bishop blanket blender bottle bracelet brave breeze brick bridge bright bucket buffalo
    butter cabin cactus camera candle canyon carpet castle cattle cedar cellar cherry
    chimney circus citizen clever cloudy coconut coffee comet copper cotton cousin coyote
    crayon cricket crystal curtain daisy dancer desert diamond dinner dolphin donkey dragon
    drawer eager eagle elbow elegant empire engine evening fabric falcon famous feather
    fence ferry fierce fiddle finger forest fossil fountain fragile frozen garden garlic
    gentle giant ginger glacier glove goblet golden gorilla grape gravel guitar hammer
    harbor harvest helmet hollow honey horizon humble hungry island ivory jacket jaguar
    jelly jungle kettle kitchen ladder lantern lemon lizard lobster lonely lucky magnet
    mango marble meadow melon mirror modest monkey mountain muffin museum napkin shallow
    needle noble oyster ocean olive orange orchard oxygen paddle palace panther parrot
    peach pebble pencil pepper piano pillow pirate planet plum polite potato pretty pumpkin
    purple puzzle quiet rabbit radio raven ribbon rocket rusty saddle salmon sandal scarf
    sector shadow silent silver simple slender spider spoon squirrel stable statue steady
    stormy subtle sugar summer tablet teapot temple thunder tiger timber tomato
    trumpet tulip tunnel turtle umbrella prairie velvet violin volcano walnut wander wealthy
    whisper window winter wizard wooden yogurt zebra
""".split())

_VT_VALUE_RANGE = (10000, 99999)
_VT_NUM_VARS = 5
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Sample:
    """One prompt with its expected answers."""

    task: str
    length: int         # target length in tokens
    index: int
    depth: float        # needle position in the haystack, 0 (start) .. 1 (end)
    seed: int
    prompt: str
    answers: list[str]
    n_tokens: int       # actual prompt tokens (without special tokens)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of all fields."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Haystack streams: unit i is always the same string for a given sample, however many
# units the fitting asks for.
# --------------------------------------------------------------------------------------

class _Stream:
    """Lazily generated, deterministic sequence of haystack units."""

    def __init__(self, make_next: Callable[[], str]):
        self._make_next = make_next
        self._units: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._units) < n:
            self._units.append(self._make_next())
        return self._units[:n]


def _noise_stream() -> _Stream:
    sentences = itertools.cycle(_NOISE)
    return _Stream(lambda: next(sentences))


def _distinct(draw: Callable[[], str], taken: set[str]) -> Callable[[], str]:
    """Wrap `draw` so it never repeats a value nor returns one of `taken` (updated)."""
    def next_value() -> str:
        while True:
            value = draw()
            if value not in taken:
                taken.add(value)
                return value
    return next_value


def _seven_digits(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_keys(rng: random.Random, target: str) -> Callable[[], str]:
    """Distinct keys other than `target`: the shuffled word list, then compounds
    ("word-word", later longer) that do not contain the target word."""
    words = [w for w in _WORDS if w != target]
    rng.shuffle(words)
    singles = iter(words)
    state = {"parts": 2, "misses": 0}
    seen: set[str] = {target}

    def next_key() -> str:
        for word in singles:
            seen.add(word)
            return word
        while True:
            parts = rng.sample(words, state["parts"])
            key = "-".join(parts)
            if key not in seen:
                seen.add(key)
                state["misses"] = 0
                return key
            state["misses"] += 1
            if state["misses"] > 1000:     # compounds of this size nearly used up
                state["parts"] += 1
                state["misses"] = 0

    return next_key


def _needle(kind: str, key: str, value: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def _niah_query(kind: str, key: str) -> str:
    return (f"\n\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
            f"The special magic {kind} for {key} mentioned in the provided text is")


def _niah_intro(kind: str) -> str:
    return (f"Some special magic {kind}s are hidden in the following text. Memorize them "
            f"carefully: I will ask you about one of the {kind}s afterwards.\n\n")


# --------------------------------------------------------------------------------------
# Task specifications
# --------------------------------------------------------------------------------------

@dataclass
class _Spec:
    intro: str
    query: str
    answers: list[str]
    stream: _Stream
    sep: str                                    # between haystack units
    # (position as a fraction of the haystack, text); inserted in this order
    needles: list[tuple[float, str]] = field(default_factory=list)
    needle_on_own_line: bool = False


def _spec_passkey(rng: random.Random, depth: float) -> _Spec:
    key = str(rng.randint(10000, 99999))
    return _Spec(
        intro=("There is an important piece of information hidden inside a lot of irrelevant "
               "text. Find it and memorize it. I will quiz you about the important "
               "information there.\n\n"),
        # "... is the number": SmolLM2-135M (HF, fp32, greedy) found 10/10 pass keys at 2K
        # and 6/6 at 4K with it, 3/10 with "... The pass key is" (it continued "the pass key")
        query="\n\nWhat is the pass key? The pass key is the number",
        answers=[key],
        stream=_noise_stream(),
        sep=" ",
        needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
    )


def _niah_spec(kind: str, key: str, value: str, depth: float,
               distractors: Optional[Callable[[], tuple[str, str]]] = None) -> _Spec:
    """A needle task: noise haystack, or (`distractors`: next (key, value)) a haystack of
    distractor needles, one per line."""
    stream = (_noise_stream() if distractors is None
              else _Stream(lambda: _needle(kind, *distractors())))
    return _Spec(intro=_niah_intro(kind), query=_niah_query(kind, key), answers=[value],
                 stream=stream, sep=" " if distractors is None else "\n",
                 needles=[(depth, _needle(kind, key, value))])


def _spec_niah_single_1(rng: random.Random, depth: float) -> _Spec:
    key = rng.choice(_WORDS)
    return _niah_spec("number", key, _seven_digits(rng), depth)


def _spec_niah_multikey_2(rng: random.Random, depth: float) -> _Spec:
    key = rng.choice(_WORDS)
    value = _seven_digits(rng)
    hay_rng = random.Random(rng.getrandbits(64))
    next_key = _word_keys(hay_rng, key)
    next_value = _distinct(lambda: _seven_digits(hay_rng), {value})
    return _niah_spec("number", key, value, depth, lambda: (next_key(), next_value()))


def _spec_niah_multikey_3(rng: random.Random, depth: float) -> _Spec:
    key, value = _uuid(rng), _uuid(rng)
    hay_rng = random.Random(rng.getrandbits(64))
    taken = {key, value}                        # keys and values never repeat, even across
    next_uuid = _distinct(lambda: _uuid(hay_rng), taken)
    return _niah_spec("uuid", key, value, depth, lambda: (next_uuid(), next_uuid()))


def _spec_vt(rng: random.Random, depth: float) -> _Spec:
    names: list[str] = []
    while len(names) < _VT_NUM_VARS:
        name = "".join(rng.choice(_LETTERS) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(*_VT_VALUE_RANGE))
    statements = [f"VAR {names[0]} = {value}"]
    statements += [f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(_VT_NUM_VARS - 1)]
    step = (1.0 - depth) / _VT_NUM_VARS
    return _Spec(
        intro=("Memorize and track the chain(s) of variable assignment hidden in the following "
               "text.\n\n"),
        query=(f"\n\nQuestion: Find all variables that are assigned the value {value} in the "
               f"text above. Answer: According to the chain(s) of variable assignment in the "
               f"text above, {_VT_NUM_VARS} variables are assigned the value {value}, "
               f"they are:"),
        answers=names,
        stream=_noise_stream(),
        sep=" ",
        needles=[(depth + k * step, s) for k, s in enumerate(statements)],
        needle_on_own_line=True,
    )


_SPECS: dict[str, Callable[[random.Random, float], _Spec]] = {
    "passkey": _spec_passkey,
    "niah_single_1": _spec_niah_single_1,
    "niah_multikey_2": _spec_niah_multikey_2,
    "niah_multikey_3": _spec_niah_multikey_3,
    "vt": _spec_vt,
}
assert tuple(_SPECS) == TASKS


def _render(spec: _Spec, n_units: int) -> str:
    """The prompt with `n_units` haystack units and the needles at their positions."""
    units = spec.stream.take(n_units)
    at: dict[int, list[str]] = {}
    for frac, text in spec.needles:
        at.setdefault(round(frac * n_units), []).append(text)
    pieces: list[tuple[str, bool]] = []        # (text, is_needle)
    for i in range(n_units + 1):
        pieces += [(text, True) for text in at.get(i, ())]
        if i < n_units:
            pieces.append((units[i], False))
    body: list[str] = []
    for j, (text, is_needle) in enumerate(pieces):
        if j:
            line = spec.needle_on_own_line and (is_needle or pieces[j - 1][1])
            body.append("\n" if line else spec.sep)
        body.append(text)
    return spec.intro + "".join(body) + spec.query


# --------------------------------------------------------------------------------------
# Length fitting
# --------------------------------------------------------------------------------------

def _fit(spec: _Spec, tokenizer: _Tokenizer, length: int) -> tuple[str, int]:
    """Largest haystack whose prompt has at most `length - HEADROOM_TOKENS` tokens.

    One call for the empty haystack, one to measure tokens per unit on a sample of units,
    two estimates (the second corrected by the first's error), then a galloping bracket
    and a binary search: typically 6-10 tokenizer calls whatever the length.
    """
    limit = length - HEADROOM_TOKENS
    cache: dict[int, tuple[str, int]] = {}

    def count(n: int) -> int:
        if n not in cache:
            prompt = _render(spec, n)
            cache[n] = (prompt, len(tokenizer.encode(prompt, add_special_tokens=False)))
        return cache[n][1]

    base = count(0)
    if base > limit:
        raise ValueError(
            f"length={length} is too small for task prompts: even without haystack the prompt "
            f"has {base} tokens > length - {HEADROOM_TOKENS} = {limit}"
        )
    sample_units = 32
    sample = spec.sep.join(spec.stream.take(sample_units)) + spec.sep
    per_unit = max(len(tokenizer.encode(sample, add_special_tokens=False)) / sample_units, 0.5)

    # Known points: count(lo) <= limit < count(hi) (hi None: not found yet).
    lo, hi = 0, None

    def probe(n: int) -> int:
        nonlocal lo, hi
        t = count(n)
        if t <= limit:
            if n > lo:
                lo = n
                if hi is not None and hi <= lo:    # token counts are not strictly monotone
                    hi = None
        elif n > lo and (hi is None or n < hi):
            hi = n
        return t

    # Two estimates; the second corrects the per-unit cost with the first's result.
    n1 = max(1, int((limit - base) / per_unit))
    t1 = probe(n1)
    per_unit = max((t1 - base) / n1, 0.5)
    n2 = max(0, n1 + math.floor((limit - t1) / per_unit))

    # Gallop away from the second estimate (steps 1, 2, 4, ...) until the limit is
    # crossed, then bisect.
    step = 1
    if probe(n2) <= limit:
        while hi is None or lo + step < hi:
            if probe(lo + step) > limit:
                break
            step *= 2
    else:
        while hi - step > lo:
            if probe(hi - step) <= limit:
                break
            step *= 2
    assert hi is not None
    while hi - lo > 1:
        probe((lo + hi) // 2)
    return cache[lo]


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def make_sample(
    task: str,
    *,
    tokenizer: _Tokenizer,
    length: int,
    depth: float,
    seed: int,
    index: int = 0,
) -> Sample:
    """One sample of `task` fitted to `length` tokens, the needle at `depth` (0..1)."""
    if task not in _SPECS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is outside [0, 1]")
    if length <= HEADROOM_TOKENS:
        raise ValueError(f"length={length} must exceed {HEADROOM_TOKENS} tokens")
    spec = _SPECS[task](random.Random(seed), float(depth))
    prompt, n_tokens = _fit(spec, tokenizer, length)
    return Sample(task=task, length=length, index=index, depth=float(depth), seed=seed,
                  prompt=prompt, answers=list(spec.answers), n_tokens=n_tokens)


def _derived_seed(seed: int, task: str, length: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{task}/{length}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1      # non-negative 63-bit


def make_samples(
    task: str,
    *,
    tokenizer: _Tokenizer,
    length: int,
    n: int,
    seed: int = 0,
) -> list[Sample]:
    """`n` samples with needle depths i / (n - 1) (0.5 for n == 1) and derived seeds."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    depths = [0.5] if n == 1 else [i / (n - 1) for i in range(n)]
    return [
        make_sample(task, tokenizer=tokenizer, length=length, depth=d,
                    seed=_derived_seed(seed, task, length, i), index=i)
        for i, d in enumerate(depths)
    ]


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of `answers` that occur in `prediction`, case-insensitive (RULER)."""
    if not answers:
        raise ValueError("answers is empty")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)
