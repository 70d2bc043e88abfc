"""
bench.py's results, kept and shown: the JSON file that collects them across runs, {model: {section:
{meta, rows, notes, error}}}, filled a row at a time (Results), a table per model and section on stdout,
and a plot of tokens/s against length, one row of panels per model and one panel per section.
"""

import json
import os

from atomic import atomic_write, atomic_write_text

SECTIONS = ('attention', 'prefill', 'decode', 'train')


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fmt(x):
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def fmt_bytes(n):
    unit = max((u for u in range(4) if n >= 1024 ** u), default=0)
    return f"{n / 1024 ** unit:.4g} {['B', 'KiB', 'MiB', 'GiB'][unit]}"

# -----------------------------------------------------------------------------
# The JSON


def is_section(name, section):
    return (name in SECTIONS and isinstance(section, dict) and isinstance(section.get('meta'), dict)
            and isinstance(section.get('rows'), list) and isinstance(section.get('notes'), list))


def read_results(path):
    """The results in path, {model: {section: {...}}}, or {} when there is no such file. A file of the
    older layout, one model's sections at the top, each naming its model in meta, is read as the same.
    A file that bench.py did not write is one ValueError: it is not ours to replace."""
    if not os.path.isfile(path):
        return {}
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        results = json.loads(raw)
        if isinstance(results, dict) and results and set(results) <= set(SECTIONS):  # the older layout
            results = {next(iter(results.values()))['meta']['model']: results}
        ours = isinstance(results, dict) and all(isinstance(model, dict) and all(is_section(*s) for s in model.items())
                                                 for model in results.values())
    except (ValueError, TypeError, KeyError):  # not JSON, not UTF-8, or another shape
        ours = False
    if not ours:
        raise ValueError(f"{path} exists but was not written by bench.py: move it away, or pass another --out")
    return results


def save_results(results, path):
    """Write results to path atomically (a full disk is one OSError naming it; the earlier file stays),
    each model's sections in the order they are run."""
    ordered = {model: {name: sections[name] for name in SECTIONS if name in sections}
               for model, sections in results.items()}
    atomic_write_text(path, json.dumps(ordered, indent=1) + '\n')


class Results:
    """The results file as a run of one model fills it: an earlier run's sections are kept but for
    those measured again, and each row is shown and saved as it comes, so a run cut short keeps it."""

    def __init__(self, path, model, section_names):
        self.path, self.model, self.all = path, model, read_results(path)
        earlier = [f"{m} {name}" for m in self.all for name in self.all[m]]
        replaced = [f"{model} {name}" for name in section_names if name in self.all.get(model, {})]
        if earlier:
            print(f"{path}: keeping {', '.join(e for e in earlier if e not in replaced) or 'nothing'}"
                  f"{'; replacing ' + ', '.join(replaced) if replaced else ''}")

    def new_section(self, name, meta):
        """An empty section of the model, in place of an earlier one of that name."""
        print(f"{self.model} {name} ...", flush=True)
        section = self.all.setdefault(self.model, {})[name] = dict(meta=meta, rows=[], notes=[], error=None)
        return section

    def add_row(self, section, row):
        section['rows'].append(row)
        print('  ' + ' '.join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
        self.save()

    def save(self):
        save_results(self.all, self.path)

# -----------------------------------------------------------------------------
# Tables


def print_table(title, header, lines):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    print(f"\n{title}")
    for line in [header, *lines]:
        print('  '.join(str(cell).rjust(width) for cell, width in zip(line, widths)))


def attention_cell(row):
    """'fwd / fwd+bwd', with the time of a non-finite result in brackets."""
    return ' / '.join(fmt(row[key]) + (f" ({fmt(row[key + '_of_nan'])})" if key + '_of_nan' in row else '')
                      for key in ('fwd_ms', 'fwd_bwd_ms'))


def attention_table(model, section):
    rows = section['rows']
    impls = list(dict.fromkeys(r['impl'] for r in rows))
    by_key = {(r['impl'], r['N']): r for r in rows}
    B = {r['N']: r['B'] for r in rows}
    lines = [[N, B[N], *(attention_cell(by_key[i, N]) if (i, N) in by_key else '' for i in impls)] for N in sorted(B)]
    print_table(f"{model}: attention op, ms: forward / forward+backward", ['N', 'B', *impls], lines)


def prefill_table(model, section):
    rows = {(r['attention'], r['N']): r for r in section['rows']}
    lines = []
    for N in sorted({N for _, N in rows}):
        s, d = rows.get(('softmax', N), {}), rows.get(('dijiang', N), {})
        both = is_number(d.get('tokens_per_s')) and is_number(s.get('tokens_per_s'))
        lines.append([N, s.get('B', d.get('B')), fmt(s.get('tokens_per_s', '')), fmt(d.get('tokens_per_s', '')),
                      f"{fmt(d['tokens_per_s'] / s['tokens_per_s'])}x" if both else ''])
    print_table(f"{model}: prefill, tokens/s", ['N', 'B', 'softmax', 'dijiang', 'dijiang/softmax'], lines)


def decode_table(model, section):
    lines = [[r['attention'], r['impl'], r['B'], r['context'], fmt(r['ms_per_token']), fmt(r['tokens_per_s']),
              fmt_bytes(r['cache_bytes'])] for r in section['rows']]
    print_table(f"{model}: decode, one token per sequence",
                ['attention', 'impl', 'B', 'context', 'ms/token', 'tokens/s', 'KV cache / state'], lines)
    for p in section.get('profile', []):
        if isinstance(p, str):
            print(f"\nprofile: {p}")
            continue
        print(f"\ndijiang CUDA-graph step at B={p['B']}: {p['kernels_per_step']:.0f} kernels, {p['kernel_ms']:.3f} ms "
              f"of kernel time; its matrix products alone: {p['products_ms']:.3f} ms")
        print_table("kernels, per step", ['us', 'calls', 'kernel'],
                    [[f"{us:.1f}", f"{calls:.0f}", name[:100]] for name, calls, us in p['top_kernels']])


def train_table(model, section):
    lines = [[r['attention'], r['block'], r['B'], fmt(r['ms_per_step']), fmt(r['tokens_per_s']),
              f"{r['mfu']:.1%}" if is_number(r['mfu']) else r['mfu']] for r in section['rows']]
    meta = section['meta']  # of the run that measured it, which may be an earlier one
    print_table(f"{model}: training step, AdamW, {meta['dtype']}, MFU of {meta['peak_flops']:.3g} FLOP/s",
                ['attention', 'block', 'B', 'ms/step', 'tokens/s', 'MFU'], lines)


TABLES = dict(attention=attention_table, prefill=prefill_table, decode=decode_table, train=train_table)


def print_tables(results):
    for model, sections in results.items():
        for name in (name for name in SECTIONS if name in sections):
            TABLES[name](model, sections[name])
            for note in sections[name]['notes']:
                print(f"note ({model} {name}): {note}")
            if sections[name].get('error'):
                print(f"error ({model} {name}): {sections[name]['error']}")

# -----------------------------------------------------------------------------
# The plot


def attention_tokens_per_s(row):
    return row['B'] * row['N'] / row['fwd_bwd_ms'] * 1000 if is_number(row['fwd_bwd_ms']) else None


PANELS = {  # section: its title, its x axis, a row's x, a row's series label, a row's tokens/s (or a failure)
    'attention': ('attention op, forward + backward', 'context length (tokens)', 'N', lambda r: r['impl'],
                  attention_tokens_per_s),
    'prefill': ('prefill, whole model', 'context length (tokens)', 'N', lambda r: r['attention'],
                lambda r: r['tokens_per_s']),
    'decode': ('decoding, whole model, each at its fastest decoder', 'context length (tokens)', 'context',
               lambda r: f"{r['attention']} B={r['B']}", lambda r: r['tokens_per_s']),
    'train': ('training step, whole model', 'block size (tokens)', 'block', lambda r: r['attention'],
              lambda r: r['tokens_per_s']),
}


def draw_plot(results, path):
    """Throughput against length, as the paper's speed figure: a row of panels per model, a column per
    section, saved to path when matplotlib is installed."""
    if not results:
        print("no plot: no section measured")
        return
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    columns = [name for name in SECTIONS if any(name in sections for sections in results.values())]
    fig, axes = plt.subplots(len(results), len(columns), figsize=(5.5 * len(columns), 4.2 * len(results)),
                             squeeze=False)
    hardware = set()
    for ax_row, (model, sections) in zip(axes, results.items()):
        for ax, name in zip(ax_row, columns):
            if name not in sections:
                ax.set_axis_off()
                continue
            title, x_label, x_key, label, tokens_per_s = PANELS[name]
            hardware.add(sections[name]['meta']['hardware'])
            series = {}
            for r in sections[name]['rows']:
                if is_number(tokens_per_s(r)):  # a failure ('OOM', 'nan', 'error: ...') has no point
                    points = series.setdefault(label(r), {})  # x -> the fastest row of the series there (decode:
                    points[r[x_key]] = max(points.get(r[x_key], 0), tokens_per_s(r))  # of its decoders)
            for line_label, points in series.items():
                ax.plot(*zip(*sorted(points.items())), marker='o', label=line_label)
            ax.set(title=f"{model}: {title}", xlabel=x_label, ylabel='tokens/s', yscale='log')
            ax.set_xscale('log', base=2)
            ax.grid(True, which='both', alpha=0.3)
            if series:  # a panel of failures only has nothing to label
                ax.legend(fontsize=7)
    fig.suptitle(f"random weights, {', '.join(sorted(hardware))}", fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=120))
    finally:
        plt.close(fig)
    print(f"wrote {path}")
