"""
The --name=value command line of every script, nanoGPT style. A script lists its settings as plain
module-level assignments between a '# settings:' comment and a '# ----' line; that block, verbatim,
is its --help:

    # settings: each can be overridden as --name=value
    lr = 3e-4  # the peak learning rate
    # -----------------------------------------------------------------------------
    settings = parse_settings(sys.argv[1:], dict(lr=lr), settings_help(__file__))
"""

import ast
import os
import sys


def parse_settings(argv, defaults, help_text):
    """The --name=value overrides in argv, as a dict, checked against defaults (name -> default).
    Values are Python literals (1e-3, True, (0.9, 0.95)) of the default's type; a string setting takes
    the text as written (--start=42 is the text '42'). --help prints help_text and exits."""
    overrides = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            print(help_text)
            sys.exit(0)
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq or name not in defaults:
            raise SystemExit(f"error: unknown argument {arg!r}: use --name=value with a name from --help")
        default = defaults[name]
        try:
            value = text if isinstance(default, str) else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)  # also 'inf' and 'nan'
            except ValueError:
                pass
        if type(value) is not type(default):
            raise SystemExit(f"error: --{name}={text}: expected a value like {default!r} ({type(default).__name__})")
        overrides[name] = value
    return overrides


def settings_help(path):
    """The usage: the file's settings block, verbatim, defaults and comments included."""
    with open(path) as f:
        block = f.read().split('# settings:')[1].split('# ----')[0]
    return f"usage: python {os.path.relpath(path)} [--name=value ...]\n\n# settings:{block.rstrip()}"
