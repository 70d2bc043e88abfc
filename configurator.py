"""
How every script starts and stops. A script's settings are assignments of literal values between a
'# settings' comment and a '# ----' line (that block, verbatim, is its --help); then main(); then
`configurator.run(main)`, which applies recipe files (config/<script>_<name>.py, the same assignments,
as nanoGPT's config/) and --name=value overrides, in order, and calls main() inside the one error
boundary: a ValueError or OSError, whose sentence names the file or setting and the fix, is one line
on stderr, 'error: ...', with no traceback. Ctrl-C (exit 130) and SIGTERM (143) unwind the run like an
exception (signals.py), then one line says what was kept. Only rank 0 speaks.
"""

import ast
import glob
import os
import sys

import signals
from signals import RANK_0


def passive_openmp():
    """OpenMP's worker threads wait passively: spinning while they wait for work makes a model on a CPU
    that also runs anything else many times slower (a small model's training ten times), and waiting
    passively costs little on an idle one. OpenMP reads this when torch loads it: call it before."""
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')


def parse_literal(name, text, default):
    """The value that --name=text gives a setting whose default is default: a string setting takes the
    text as written, a float one any number (also inf and nan), the others a Python literal of its type."""
    kind = type(default)
    try:
        value = text if kind is str else float(text) if kind is float else ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a value of no type but a string's
    if type(value) is not kind:
        raise ValueError(f"--{name}={text}: expected a value like {default!r} ({kind.__name__})")
    return value


def read_recipe(path, defaults):
    """The settings a recipe file assigns, {name: value}."""
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
        statements = ast.parse(source, path).body
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise ValueError(f"recipe {path} cannot be read ({type(e).__name__}): pass a file of config/") from None
    values = {}
    for node in statements:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # its docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], 'id', None) in defaults):
            raise ValueError(f"{path}, line {node.lineno}: a recipe holds only assignments of this script's settings")
        name, text = node.targets[0].id, ast.get_source_segment(source, node.value)
        if isinstance(defaults[name], str) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            text = node.value.value  # a recipe is Python: its strings are quoted, unlike on the command line
        values[name] = parse_literal(name, text, defaults[name])
    return values


def parse_settings(argv, defaults):
    """The settings that argv changes, {name: value}, from recipe files and --name=value, in order."""
    changed = {}
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        if arg.endswith('.py') and not arg.startswith('--'):
            changed.update(read_recipe(arg, defaults))
        elif arg.startswith('--') and eq and name in defaults:
            changed[name] = parse_literal(name, text, defaults[name])
        else:
            raise ValueError(f"unknown argument {arg!r}: use --name=value with a name from --help, or a recipe file")
    return changed


def settings_block(path):
    """A script's settings block, as text, and the names it assigns."""
    with open(path, encoding='utf-8') as f:
        block = f.read().split('# settings', 1)[1].split('# ----')[0]
    return block.rstrip(), [n.targets[0].id for n in ast.parse(block.partition('\n')[2]).body if isinstance(n, ast.Assign)]


def usage(path):
    """--help: the settings block, verbatim, and the recipes in config/ for this script."""
    script = os.path.splitext(os.path.basename(path))[0]
    recipes = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', f'{script}_*.py')))
    lines = [f"usage: python {os.path.relpath(path)} [config/{script}_NAME.py ...] [--name=value ...]", '',
             f"# settings{settings_block(path)[0]}"]
    lines += ['', 'recipes (each sets some of the settings above; later arguments override earlier ones):'] if recipes else []
    for recipe in recipes:
        with open(recipe, encoding='utf-8') as f:
            lines.append(f"  {os.path.relpath(recipe)}: {(ast.get_docstring(ast.parse(f.read())) or '').partition(chr(10))[0]}")
    return '\n'.join(lines)


def check(ok, name, value, need):
    """A bad setting is one ValueError, 'name=value: need'."""
    if not ok:
        raise ValueError(f"{name}={value!r}: {need}")


def fail(message, status=1):
    if RANK_0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def run(main, kept=lambda: 'the files written before this run are as they were'):
    """Set the script's settings from sys.argv, then run main(); kept() says, in the one line of a run
    that stops, what is kept and how to go on."""
    script = main.__globals__
    if {'-h', '--help'} & set(sys.argv[1:]):
        return print(usage(script['__file__']))
    with signals.interruptible():
        try:
            names = settings_block(script['__file__'])[1]
            script.update(parse_settings(sys.argv[1:], {name: script[name] for name in names}))
            main()
        except KeyboardInterrupt as e:  # Interrupted, or Python's own where another handler replaced ours
            status = getattr(e, 'exit_status', 130)
            fail(f"{'interrupted' if status == 130 else 'terminated'}; {kept()}", status)
        except ValueError as e:
            fail(e)
        except BrokenPipeError:  # stdout's reader is gone (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except OSError as e:
            fail(f"{e.filename or 'a file'}: {e.strerror or e}; {kept()}")
        except (RuntimeError, MemoryError) as e:
            if not (isinstance(e, MemoryError) or 'out of memory' in str(e) or "can't allocate memory" in str(e)):
                raise  # a bug, not bad input: its traceback is the report
            fail(f"out of memory ({(str(e) or type(e).__name__).splitlines()[0][:120]}); {kept()}")
