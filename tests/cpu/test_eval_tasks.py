"""Offline long-context task generator (vllm_dash.eval.tasks), with a real tokenizer:
the byte-level BPE of the generated tiny Llama."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from vllm_dash.eval import tasks as eval_tasks

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
         "There and back again.")
NUMBER_LINE = re.compile(r"One of the special magic numbers for (\S+) is: (\d{7})\.")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
UUID_LINE = re.compile(rf"One of the special magic uuids for ({UUID}) is: ({UUID})\.")
NIAH_QUERY = re.compile(
    r"\n\nWhat is the special magic (number|uuid) for (\S+) mentioned in the provided text\? "
    r"The special magic \1 for \2 mentioned in the provided text is$")
VT_QUERY = re.compile(
    r"\n\nQuestion: Find all variables that are assigned the value (\d{5}) in the text above\. "
    r"Answer: According to the chain\(s\) of variable assignment in the text above, 5 "
    r"variables are assigned the value \1, they are:$")


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def n_tok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def needle_of(s: eval_tasks.Sample) -> str:
    """The target needle text, rebuilt from the answers and the query."""
    if s.task == "passkey":
        key = s.answers[0]
        return f"The pass key is {key}. Remember it. {key} is the pass key."
    if s.task == "vt":
        return f"VAR {s.answers[0]} = "
    kind, key = NIAH_QUERY.search(s.prompt).groups()
    return f"One of the special magic {kind}s for {key} is: {s.answers[0]}."


def haystack_units(s: eval_tasks.Sample, upto: int | None = None) -> list[str]:
    """The haystack units (noise sentences or distractor lines) of `s.prompt[:upto]`."""
    text = s.prompt[:upto]
    if s.task in ("niah_multikey_2", "niah_multikey_3"):
        pattern = NUMBER_LINE if s.task == "niah_multikey_2" else UUID_LINE
        needle = needle_of(s)
        return [m.group(0) for m in pattern.finditer(text) if m.group(0) != needle]
    return re.findall("|".join(re.escape(x) for x in NOISE), text)


def units_before(s: eval_tasks.Sample, text: str) -> int:
    return len(haystack_units(s, s.prompt.index(text)))


def answer_prefix_ok(s: eval_tasks.Sample) -> bool:
    if s.task == "passkey":
        return s.prompt.endswith("\n\nWhat is the pass key? The pass key is the number")
    if s.task == "vt":
        m = VT_QUERY.search(s.prompt)
        return m is not None
    m = NIAH_QUERY.search(s.prompt)
    kind = "uuid" if s.task == "niah_multikey_3" else "number"
    return m is not None and m.group(1) == kind


def test_api_constants():
    assert eval_tasks.TASKS == (
        "passkey", "niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt")
    assert set(eval_tasks.MAX_NEW_TOKENS) == set(eval_tasks.TASKS)
    assert all(8 <= v <= 64 for v in eval_tasks.MAX_NEW_TOKENS.values())


@pytest.mark.parametrize("length", [512, 2048])
@pytest.mark.parametrize("task", eval_tasks.TASKS)
def test_length_fit(tok, task, length):
    samples = eval_tasks.make_samples(task, tokenizer=tok, length=length, n=3, seed=7)
    for s in samples:
        assert s.task == task and s.length == length
        assert s.n_tokens == n_tok(tok, s.prompt)
        assert s.n_tokens <= length - 8
        # As close to the limit as one haystack unit allows.
        unit = max(n_tok(tok, u) for u in set(haystack_units(s)))
        assert length - 8 - s.n_tokens <= max(0.02 * length, unit + 2), (s.n_tokens, unit)
        if unit <= 0.05 * length:        # uuid lines of this small vocabulary: ~90 tokens
            assert s.n_tokens >= 0.9 * length
        assert answer_prefix_ok(s)
        json.loads(json.dumps(s.to_dict()))


@pytest.mark.parametrize("task", eval_tasks.TASKS)
def test_needle_placement(tok, task):
    samples = eval_tasks.make_samples(task, tokenizer=tok, length=1024, n=5, seed=3)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [s.index for s in samples] == list(range(5))
    positions = []
    for s in samples:
        needle = needle_of(s)
        assert s.prompt.count(needle) == 1
        for answer in s.answers:
            assert answer in s.prompt
        total = len(haystack_units(s))
        assert total >= 5                          # uuid lines: ~90 tokens each
        assert units_before(s, needle) == round(s.depth * total)
        positions.append(s.prompt.index(needle))
        if task == "passkey":
            assert s.prompt.count(s.answers[0]) == 2 and re.fullmatch(r"\d{5}", s.answers[0])
        elif task in ("niah_single_1", "niah_multikey_2"):
            assert s.prompt.count(s.answers[0]) == 1 and re.fullmatch(r"\d{7}", s.answers[0])
        elif task == "niah_multikey_3":
            assert s.prompt.count(s.answers[0]) == 1 and re.fullmatch(UUID, s.answers[0])
        else:
            check_vt_chain(s, total)
    assert positions == sorted(positions) and len(set(positions)) == 5


def check_vt_chain(s: eval_tasks.Sample, total: int) -> None:
    names = s.answers
    assert len(names) == 5 and len(set(names)) == 5
    assert all(re.fullmatch(r"[A-Z]{5}", x) for x in names)
    value = VT_QUERY.search(s.prompt).group(1)
    statements = [f"VAR {names[0]} = {value}\n"]
    statements += [f"\nVAR {names[k + 1]} = VAR {names[k]}\n" for k in range(4)]
    at = [s.prompt.index(st) for st in statements]
    assert at == sorted(at)                        # the chain is in order
    for k, st in enumerate(statements):
        assert s.prompt.count(st.strip()) == 1
        want = round((s.depth + k * (1 - s.depth) / 5) * total)
        assert units_before(s, st) == want, (k, s.depth)
    assert len(re.findall(r"VAR [A-Z]{5} =", s.prompt)) == 5


def test_depth_extremes(tok):
    s0 = eval_tasks.make_sample("passkey", tokenizer=tok, length=512, depth=0.0, seed=1)
    s1 = eval_tasks.make_sample("passkey", tokenizer=tok, length=512, depth=1.0, seed=1)
    intro_end = s0.prompt.index("\n\n") + 2
    assert s0.prompt.index(needle_of(s0)) == intro_end
    assert s1.prompt.index(needle_of(s1)) + len(needle_of(s1)) == s1.prompt.rindex("\n\nWhat")
    one = eval_tasks.make_samples("passkey", tokenizer=tok, length=512, n=1)
    assert [s.depth for s in one] == [0.5]


@pytest.mark.parametrize("task", eval_tasks.TASKS)
def test_determinism(tok, task):
    a = eval_tasks.make_samples(task, tokenizer=tok, length=512, n=3, seed=0)
    b = eval_tasks.make_samples(task, tokenizer=tok, length=512, n=3, seed=0)
    c = eval_tasks.make_samples(task, tokenizer=tok, length=512, n=3, seed=1)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert len({s.seed for s in a + c}) == 6                # each sample its own seed
    assert len({tuple(s.answers) for s in a}) == 3
    # A sample is reproducible from its own (derived) seed.
    again = eval_tasks.make_sample(task, tokenizer=tok, length=512, depth=a[1].depth,
                                   seed=a[1].seed, index=1)
    assert again.to_dict() == a[1].to_dict()


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_multikey_distractors(tok, task):
    pattern = NUMBER_LINE if task == "niah_multikey_2" else UUID_LINE
    for s in eval_tasks.make_samples(task, tokenizer=tok, length=2048, n=3, seed=5):
        pairs = pattern.findall(s.prompt)
        keys = [k for k, _ in pairs]
        values = [v for _, v in pairs]
        target = NIAH_QUERY.search(s.prompt).group(2)
        assert len(pairs) >= 10
        assert len(set(keys)) == len(keys) and len(set(values)) == len(values)
        assert keys.count(target) == 1
        assert dict(pairs)[target] == s.answers[0]
        # The haystack is only needles: one per line between the intro and the query.
        body = s.prompt.split("\n\n")[1]
        assert body.split("\n") == [m.group(0) for m in pattern.finditer(s.prompt)]


def test_word_keys_run_past_the_word_list():
    import random
    target = eval_tasks._WORDS[0]
    draw = eval_tasks._word_keys(random.Random(0), target)
    keys = [draw() for _ in range(3 * len(eval_tasks._WORDS))]
    assert len(set(keys)) == len(keys)
    assert target not in keys and not any(target in k.split("-") for k in keys)
    assert sum("-" in k for k in keys) == len(keys) - (len(eval_tasks._WORDS) - 1)


def test_word_list():
    words = eval_tasks._WORDS
    assert 150 <= len(words) <= 300 and len(set(words)) == len(words)
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert not [(a, b) for a in words for b in words if a != b and a in b]
    template_words = set(re.findall(r"[a-z]+", " ".join(NOISE).lower()))
    template_words |= {"special", "magic", "number", "numbers", "hidden", "answer", "text"}
    assert not template_words & set(words)


def test_tokenizer_calls_bounded(tok):
    class Counting:
        calls = 0

        def encode(self, text, add_special_tokens=False):
            Counting.calls += 1
            return tok.encode(text, add_special_tokens=add_special_tokens)

    counting = Counting()
    for task in eval_tasks.TASKS:
        Counting.calls = 0
        s = eval_tasks.make_sample(task, tokenizer=counting, length=8192, depth=0.5, seed=2)
        assert Counting.calls <= 15, (task, Counting.calls)
        assert 0.98 * 8192 <= s.n_tokens <= 8192 - 8


def test_string_match_all():
    sm = eval_tasks.string_match_all
    assert sm("The pass key is 12345.", ["12345"]) == 1.0
    assert sm("no idea", ["12345"]) == 0.0
    assert sm("they are: abcde, FGHIJ", ["ABCDE", "fghij", "KLMNO", "PQRST", "UVWXY"]) == 0.4
    assert sm("ABCDE FGHIJ KLMNO PQRST UVWXY", ["abcde", "fghij", "klmno", "pqrst",
                                                  "uvwxy"]) == 1.0
    assert sm("", ["x"]) == 0.0
    with pytest.raises(ValueError):
        sm("x", [])


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="length=64"):
        eval_tasks.make_sample("niah_multikey_3", tokenizer=tok, length=64, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="length=40"):
        eval_tasks.make_samples("passkey", tokenizer=tok, length=40, n=2)
    with pytest.raises(ValueError, match="task"):
        eval_tasks.make_sample("qa_1", tokenizer=tok, length=512, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        eval_tasks.make_sample("passkey", tokenizer=tok, length=512, depth=1.5, seed=0)


def test_imports_neither_vllm_nor_torch():
    code = ("import sys; from vllm_dash.eval import tasks as eval_tasks; "
            "print(sorted({'vllm', 'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
