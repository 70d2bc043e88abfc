"""What the tests share: the DiJiang formula in float64, the error measure, and the repo's paths.

Tolerances throughout are relative errors ||x - ref|| / ||ref||: fp32 against float64 lands near
1e-7 over a few thousand terms (tests allow 1e-5); bf16 inputs and bf16 matrix products, 1e-2.
"""
import os
import runpy
import signal
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repo's modules (dijiang, train, ...) import as top-level names
PYTHIA_TOKENIZER = os.path.join(REPO, 'data', 'pythia-tokenizer.json')


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def reference_attention(q, k, v, proj, decay, initial_state=None):
    """The formula, written out in float64 with no chunks, no recurrence and no shared helpers:
    o_n = sum_{m <= n} gamma^(n-m) (phi(q_n) . phi(k_m)) v_m + gamma^(n+1) phi(q_n) S_0, phi(x) = softmax(x @ P)
    (phi(x) = x when proj is None), and the state after the last token, sum_m gamma^(T-1-m) phi(k_m)^T v_m + gamma^T S_0.
    q (B, T, H, D), k, v (B, T, H_kv, D): query head h reads kv head h // (H / H_kv) (grouped-query attention);
    proj (D, D) or None, decay (H,), initial_state S_0 (B, H, D, D) or None; the state is per query head."""
    q, k, v, gamma = (x.double() for x in (q, k, v, decay))
    kv_head = torch.arange(q.shape[2], device=q.device) // (q.shape[2] // k.shape[2])
    k, v = k[:, :, kv_head], v[:, :, kv_head]
    if proj is None:
        phi_q, phi_k = q, k
    else:
        phi_q, phi_k = torch.softmax(q @ proj.double(), -1), torch.softmax(k @ proj.double(), -1)
    T = q.shape[1]
    n = torch.arange(T, device=q.device)
    distance = n[:, None] - n[None, :]
    weights = torch.where(distance >= 0, gamma[:, None, None] ** distance.clamp(min=0), 0.0)  # (H, T, T)
    o = torch.einsum('bhnm,bmhe->bnhe', torch.einsum('bnhd,bmhd->bhnm', phi_q, phi_k) * weights, v)
    to_end = (gamma[None, :] ** (T - 1 - n)[:, None])[None, :, :, None]  # (1, T, H, 1)
    final = torch.einsum('bmhd,bmhe->bhde', phi_k * to_end, v)
    if initial_state is not None:
        s0 = initial_state.double()
        from_start = (gamma[None, :] ** (n + 1)[:, None])[None, :, :, None]
        o = o + torch.einsum('bnhd,bhde->bnhe', phi_q * from_start, s0)
        final = final + gamma[None, :, None, None] ** T * s0
    return o, final


def run_script(capture, script, *args):
    """`python script args` in this process (no second interpreter start-up: torch is imported once).
    capture is pytest's capsys or capfd. Returns (exit status, stdout, stderr)."""
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv, status = [script, *args], 0
    try:
        runpy.run_path(os.path.join(REPO, script), run_name='__main__')
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    out, err = capture.readouterr()
    return status, out, err


def assert_one_error_line(status, out, err, *names, code=None):
    """A failing status (or exactly code), stderr one line 'error: ...' naming each of names, no traceback."""
    assert status != 0 if code is None else status == code, (status, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert 'Traceback' not in out + err
    return lines[0]


@pytest.fixture(autouse=True)
def keep_the_sigint_handler():
    """Scripts run in this process (runpy) install their own Ctrl-C handler: put pytest's back after each test."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
