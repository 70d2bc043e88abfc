"""docs/walkthrough.md runs as written: every ```python block, executed in order in one namespace,
prints what the ```text block after it shows.

Words and integers must match exactly. Decimals may differ by 2% relative or 1e-3 absolute, so that
a float rounding differently on another CPU or BLAS passes, and a changed result does not. A number
printed in e-notation below 1e-4 is a round-off level (the largest difference between two forms of
the same function): any value below 1e-4 matches it, and anything larger fails.

A python block is followed by its text block (blank lines between are fine), or by the line
<!-- no output --> when it prints nothing. The blocks run in a temporary working directory, so
nothing they write lands in the repository.
"""
import contextlib
import io
import math
import os
import re
import sys
import time
import traceback

import pytest
import torch

from conftest import REPO

WALKTHROUGH = os.path.join(REPO, 'docs', 'walkthrough.md')
FENCE = re.compile(r'^```[ \t]*(\w*)[^\n]*\n(.*?)^```[ \t]*$', re.M | re.S)
NO_OUTPUT = '<!-- no output -->'
NUMBER = re.compile(r'[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|[-+]?\b(?:nan|inf)\b')
REL_TOL, ABS_TOL = 0.02, 1e-3
ROUNDOFF = 1e-4
TIME_LIMIT_S = 60


def extract_blocks(markdown):
    """[(line number, code, expected output or None for <!-- no output -->)] for each python block.
    ValueError when a python block has neither a text block nor the marker right after it."""
    fences = list(FENCE.finditer(markdown))
    blocks = []
    for i, fence in enumerate(fences):
        if fence.group(1) != 'python':
            continue
        line = markdown.count('\n', 0, fence.start()) + 1
        end = fence.end()
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        between = markdown[end:nxt.start()] if nxt else markdown[end:]
        if between.strip().startswith(NO_OUTPUT):
            blocks.append((line, fence.group(2), None))
        elif nxt is not None and nxt.group(1) == 'text' and not between.strip():
            blocks.append((line, fence.group(2), nxt.group(2)))
        else:
            raise ValueError(f"walkthrough.md line {line}: a python block must be followed by a ```text block "
                             f"with its output, or by {NO_OUTPUT}")
    return blocks


def normalize(text):
    """Trailing spaces and blank lines at the ends do not count."""
    return '\n'.join(line.rstrip() for line in text.strip('\n').splitlines())


def is_integer(token):
    return re.fullmatch(r'[-+]?\d+', token) is not None


def numbers_match(got, want):
    if is_integer(got) and is_integer(want):
        return int(got) == int(want)
    g, w = float(got), float(want)
    if math.isnan(g) or math.isnan(w):
        return math.isnan(g) and math.isnan(w)
    if 'e' in want.lower() and abs(w) < ROUNDOFF:
        return abs(g) < ROUNDOFF
    return g == w or abs(g - w) <= max(ABS_TOL, REL_TOL * abs(w))


def compare_output(got, want):
    """None when got matches want (words exactly, numbers within tolerance), else what differs."""
    got, want = normalize(got), normalize(want)
    got_lines, want_lines = got.splitlines(), want.splitlines()
    if len(got_lines) != len(want_lines):
        return f"{len(got_lines)} lines printed, {len(want_lines)} expected"
    for n, (g, w) in enumerate(zip(got_lines, want_lines), 1):
        if NUMBER.sub('#', g) != NUMBER.sub('#', w):
            return f"line {n}: printed {g!r}, expected {w!r}"
        for a, b in zip(NUMBER.findall(g), NUMBER.findall(w)):
            if not numbers_match(a, b):
                return f"line {n}: printed {a} where {b} is expected, in {g!r}"
    return None


def run_walkthrough(path, cwd):
    """Run each python block of path in order in one namespace, inside cwd. Yields (line, code,
    expected, printed)."""
    with open(path, encoding='utf-8') as f:
        blocks = extract_blocks(f.read())
    namespace = {'__name__': '__walkthrough__'}
    old_cwd, old_path, old_threads = os.getcwd(), list(sys.path), torch.get_num_threads()
    sys.path.insert(0, REPO)
    os.chdir(cwd)
    try:
        for line, code, expected in blocks:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(code, f'{path}:{line}', 'exec'), namespace)
            except Exception:
                pytest.fail(f"the python block at walkthrough.md line {line} raised:\n{traceback.format_exc()}\n"
                            f"it had printed:\n{out.getvalue()}")
            yield line, code, expected, out.getvalue()
    finally:  # the walkthrough sets one thread; the rest of the test session keeps its own setting
        os.chdir(old_cwd)
        sys.path[:] = old_path
        torch.set_num_threads(old_threads)


def test_every_python_block_has_an_output_block():
    with open(WALKTHROUGH, encoding='utf-8') as f:
        blocks = extract_blocks(f.read())
    assert len(blocks) >= 6
    assert all(expected is None or expected.strip() for _, _, expected in blocks)


def test_compare_output_is_strict_on_words_and_integers_and_tolerant_on_floats():
    want = "loss 2.345 after 40 steps, diff 1.19e-07\nshape (4, 16, 16)"
    assert compare_output(want, want) is None
    assert compare_output("loss 2.350 after 40 steps, diff 2.38e-07  \nshape (4, 16, 16)\n", want) is None
    assert compare_output("loss 2.500 after 40 steps, diff 1.19e-07\nshape (4, 16, 16)", want)  # a changed loss
    assert compare_output("loss 2.345 after 41 steps, diff 1.19e-07\nshape (4, 16, 16)", want)  # an integer
    assert compare_output("loss 2.345 after 40 steps, diff 1.19e-02\nshape (4, 16, 16)", want)  # a diff that grew
    assert compare_output("loss 2.345 after 40 steps, diff 1.19e-07\nshape (4, 16, 8)", want)
    assert compare_output("gain 2.345 after 40 steps, diff 1.19e-07\nshape (4, 16, 16)", want)  # a word
    assert compare_output("loss 2.345 after 40 steps, diff 1.19e-07", want)  # a missing line
    assert compare_output("True", "False") and compare_output("-0.5", "0.5")
    assert compare_output("diff 3.1e-06", "diff 2.4e-07") is None  # round-off is round-off
    assert compare_output("diff 0.0e+00", "diff 2.4e-07") is None
    assert compare_output("diff 2.0e-04", "diff 2.4e-07")  # but two forms of one function must agree


def test_extract_blocks_requires_an_output_block():
    assert extract_blocks("```python\nprint(1)\n```\n\n```text\n1\n```\n") == [(1, "print(1)\n", "1\n")]
    assert extract_blocks(f"```python\nx = 1\n```\n{NO_OUTPUT}\n") == [(1, "x = 1\n", None)]
    with pytest.raises(ValueError, match='line 3'):
        extract_blocks("Text.\n\n```python\nprint(1)\n```\nProse in between.\n```text\n1\n```\n")
    with pytest.raises(ValueError, match='line 1'):
        extract_blocks("```python\nprint(1)\n```\n")


def test_walkthrough_runs_and_prints_what_it_shows(tmp_path):
    start = time.perf_counter()
    for line, code, expected, printed in run_walkthrough(WALKTHROUGH, tmp_path):
        if expected is None:
            assert printed == '', f"the block at walkthrough.md line {line} is marked {NO_OUTPUT} but printed:\n{printed}"
            continue
        problem = compare_output(printed, expected)
        assert problem is None, (f"the block at walkthrough.md line {line} printed other output than the doc shows: "
                                 f"{problem}\n--- printed:\n{printed}\n--- the doc shows:\n{expected}")
    elapsed = time.perf_counter() - start
    assert elapsed < TIME_LIMIT_S, f"the walkthrough took {elapsed:.0f} s; keep it under {TIME_LIMIT_S} s on 2 CPU cores"
