"""configurator.py: settings from recipe files and --name=value, --help, and the one error boundary every
script runs in (one 'error:' line and the exit status; no traceback)."""
import math
import os
import signal
import subprocess
import sys

import pytest

import configurator
from conftest import REPO, assert_one_error_line

DEFAULTS = dict(lr=1e-3, steps=10, name='out', flag=False, betas=(0.9, 0.95))


def test_values_take_the_type_of_their_default():
    assert configurator.parse_settings(['--lr=3e-4', '--steps=5', '--name=42', '--flag=True', '--betas=(0.8,0.9)'],
                                       DEFAULTS) == dict(lr=3e-4, steps=5, name='42', flag=True, betas=(0.8, 0.9))
    assert configurator.parse_settings(['--lr=1'], DEFAULTS) == dict(lr=1.0)  # an int where a float goes
    assert configurator.parse_settings(['--lr=inf'], DEFAULTS) == dict(lr=math.inf)  # any number a float takes
    assert math.isnan(configurator.parse_settings(['--lr=nan'], DEFAULTS)['lr'])
    with pytest.raises(ValueError, match=r"--lr=True: expected a value like 0.001 \(float\)"):
        configurator.parse_settings(['--lr=True'], DEFAULTS)  # a bool is no number here
    assert configurator.parse_settings(["--name='q'"], DEFAULTS) == dict(name="'q'")  # a string is the text as written
    with pytest.raises(ValueError, match=r"--steps=many: expected a value like 10 \(int\)"):
        configurator.parse_settings(['--steps=many'], DEFAULTS)
    with pytest.raises(ValueError, match="unknown argument '--nope=1'"):
        configurator.parse_settings(['--nope=1'], DEFAULTS)
    with pytest.raises(ValueError, match="unknown argument 'lr=1'"):
        configurator.parse_settings(['lr=1'], DEFAULTS)


def test_recipes_apply_in_order_with_the_command_line(tmp_path):
    recipe = tmp_path / 'train_fast.py'
    recipe.write_text('"""A fast recipe."""\nlr = 1e-2  # higher\nsteps = 3\n')
    assert configurator.parse_settings([str(recipe)], DEFAULTS) == dict(lr=1e-2, steps=3)
    assert configurator.parse_settings([str(recipe), '--lr=5e-3'], DEFAULTS) == dict(lr=5e-3, steps=3)
    assert configurator.parse_settings(['--lr=5e-3', str(recipe)], DEFAULTS) == dict(lr=1e-2, steps=3)
    bad = tmp_path / 'train_bad.py'
    bad.write_text('lr = 1e-2\nimport os\n')
    with pytest.raises(ValueError, match=r"train_bad.py, line 2: a recipe holds only assignments"):
        configurator.parse_settings([str(bad)], DEFAULTS)
    bad.write_text("steps = 'three'\n")
    with pytest.raises(ValueError, match=r"--steps='three': expected a value like 10"):
        configurator.parse_settings([str(bad)], DEFAULTS)
    with pytest.raises(ValueError, match=r"recipe .*missing.py cannot be read"):
        configurator.parse_settings([str(tmp_path / 'missing.py')], DEFAULTS)


SCRIPT = '''
import configurator
import signals
signals.stop_on_signals()
import os, sys, time

# settings: each can be overridden as --name=value
mode = 'ok'  # what main() does
seconds = 0.0
# -----------------------------------------------------------------------------


def main():
    print(f"mode={mode}", flush=True)
    if mode == 'value':
        raise ValueError("mode='value': a sentence naming the fix")
    if mode == 'disk':
        raise OSError(28, 'No space left on device', '/full/ckpt.pt')
    if mode == 'memory':
        raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB\\nmore detail')
    if mode == 'bug':
        raise RuntimeError('a real bug')
    if mode == 'pipe':
        for _ in range(100000):
            print('x' * 100)
    time.sleep(seconds)


if __name__ == '__main__':
    configurator.run(main, kept=lambda: 'the old files are kept')
'''


@pytest.fixture(scope='module')
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp('script') / 'demo.py'
    path.write_text(SCRIPT)
    return path


def run(script, *args, env=None):
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                            env={**os.environ, 'PYTHONPATH': REPO, **(env or {})})
    return result.returncode, result.stdout, result.stderr


def test_each_failure_is_one_line_and_its_exit_status(script):
    assert run(script)[0] == 0
    assert_one_error_line(*run(script, '--mode=value'), "error: mode='value': a sentence naming the fix", code=1)
    assert_one_error_line(*run(script, '--mode=disk'), '/full/ckpt.pt: No space left on device; the old files are kept')
    assert_one_error_line(*run(script, '--mode=memory'), 'out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)')
    assert_one_error_line(*run(script, '--nope=1'), "unknown argument '--nope=1'")
    status, _, err = run(script, '--mode=bug')  # not bad input: a bug keeps its traceback
    assert status == 1 and 'Traceback' in err and 'a real bug' in err
    # under torchrun only rank 0 speaks; the others fail as quietly as they can
    status, _, err = run(script, '--mode=value', env=dict(RANK='1'))
    assert status == 1 and err == ''


def test_help_is_the_settings_block_and_the_recipes(script):
    status, out, _ = run(script, '--help')
    assert status == 0 and "mode = 'ok'  # what main() does" in out and 'usage: python' in out


def test_a_closed_stdout_stops_quietly(script):
    process = subprocess.Popen([sys.executable, str(script), '--mode=pipe'], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, 'PYTHONPATH': REPO})
    process.stdout.readline()
    process.stdout.close()
    assert process.wait(timeout=60) == 141 and process.stderr.read() == b''


@pytest.mark.parametrize('signum, status, word', [(signal.SIGINT, 130, 'interrupted'), (signal.SIGTERM, 143, 'terminated')])
def test_ctrl_c_and_sigterm_unwind_and_say_what_is_kept(script, signum, status, word):
    process = subprocess.Popen([sys.executable, str(script), '--seconds=30'], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONPATH': REPO})
    assert process.stdout.readline() == 'mode=ok\n'  # inside main()
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert_one_error_line(process.returncode, out, err, f"error: {word}; the old files are kept", code=status)


def test_a_signal_before_main_is_one_line(tmp_path):
    slow_start = tmp_path / 'slow.py'
    slow_start.write_text(SCRIPT.replace('import os, sys, time', 'import os, sys, time\nprint("importing", flush=True)\n'
                                         'time.sleep(30)'))
    process = subprocess.Popen([sys.executable, str(slow_start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, 'PYTHONPATH': REPO})
    assert process.stdout.readline() == 'importing\n'
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert_one_error_line(process.returncode, out, err, 'interrupted while starting; nothing was written', code=130)
