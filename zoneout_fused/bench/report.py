"""Tables of benchmark records: plain text for the terminal, markdown for the README."""
from __future__ import annotations

from collections import OrderedDict

COLUMNS = ("backend", "check", "fwd ms", "fwd+bwd ms", "f+b us/step", "peak MB", "vs ref fwd", "vs ref f+b",
           "vs nn.LSTM fwd", "vs nn.LSTM f+b")


def _ms(value):
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _mb(value):
    return "-" if value is None else f"{value:.1f}"


def _load(records: list[dict]) -> str:
    loads = [r["load_avg_1m"] for r in records if r.get("load_avg_1m") is not None]
    return f", 1-min load average {min(loads):.1f}-{max(loads):.1f} during the run" if loads else ""


def rows(records: list[dict]) -> list[tuple]:
    """One row per backend (fwd and fwd+bwd merged), in the records' order."""
    by_backend: "OrderedDict[str, dict]" = OrderedDict()
    for record in records:
        by_backend.setdefault(record["backend"], {})[record["mode"]] = record
    out = []
    for backend, modes in by_backend.items():
        fwd, both = modes.get("fwd", {}), modes.get("fwd+bwd", {})
        any_record = both or fwd
        per_step = both.get("ms_per_step") if both else fwd.get("ms_per_step")
        out.append((backend, any_record["check"], _ms(fwd.get("median_ms")), _ms(both.get("median_ms")),
                    "-" if per_step is None else f"{per_step * 1e3:.0f}",
                    _mb(both.get("peak_mem_mb") if both else fwd.get("peak_mem_mb")),
                    _ratio(fwd.get("speedup_vs_reference")), _ratio(both.get("speedup_vs_reference")),
                    _ratio(fwd.get("speedup_vs_nn_lstm")), _ratio(both.get("speedup_vs_nn_lstm"))))
    return out


def notes(records: list[dict]) -> list[str]:
    seen, out = set(), []
    for record in records:
        message = record.get("error")
        if message and (record["backend"], message) not in seen:
            seen.add((record["backend"], message))
            out.append(f"{record['backend']} ({record['mode']}): {message}")
        elif record["check"] == "ok" and record["backend"] not in seen:
            seen.add(record["backend"])
            out.append(f"{record['backend']}: check {record['check_detail']}")
    return out


def text_table(case, dtype_name: str, records: list[dict], zoneout_kwargs: dict) -> str:
    body = rows(records)
    widths = [max(len(str(row[i])) for row in body + [COLUMNS]) for i in range(len(COLUMNS))]
    fmt = lambda row: "  ".join(str(cell).ljust(w) if i < 2 else str(cell).rjust(w)  # noqa: E731
                                for i, (cell, w) in enumerate(zip(row, widths)))
    z = ", ".join(f"{k}={v}" for k, v in zoneout_kwargs.items())
    lines = [f"\n== {case.describe()}  {dtype_name}  [{z}]", fmt(COLUMNS), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in body]
    lines += ["  " + note for note in notes(records)]
    return "\n".join(lines)


def markdown(records: list[dict]) -> str:
    """A README-ready table per (case, dtype), with the machine and commit above them."""
    if not records:
        return "(no records)\n"
    first = records[0]
    commit = (first.get("commit") or "unknown")[:12] + (" + local changes" if first.get("commit_dirty") else "")
    lines = [f"Device: {first['device']}, torch {first['torch']}, triton {first['triton']}, commit {commit}, "
             f"torch threads {first.get('threads') or '-'}{_load(records)}. Medians of {max(r['repeats'] for r in records)} interleaved runs "
             f"after {first['warmup']} warm-up; \"vs\" columns are speedups (time of the peer / time of the row). "
             f"Peak memory: {first['peak_mem_method']}.", ""]
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for record in records:
        groups.setdefault((record["config"], record["dtype"]), []).append(record)
    for (config, dtype), group in groups.items():
        r = group[0]
        lines += [f"**{config}** (B={r['batch']}, T={r['steps']}, I={r['input_size']}, H={r['hidden_size']}, "
                  f"layers={r['num_layers']}, z_c={r['zoneout_cell']}, z_h={r['zoneout_hidden']}, {dtype})", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows(group)]
        errors = [n for n in notes(group) if ": check " not in n]
        lines += [""] + [f"- {n}" for n in errors] + ([""] if errors else [])
    return "\n".join(lines).rstrip() + "\n"


def pivot(records: list[dict], mode: str = "fwd+bwd") -> str:
    """A compact markdown table: microseconds per step, one row per backend, one column per case."""
    chosen = [r for r in records if r["mode"] == mode]
    configs = list(OrderedDict.fromkeys(r["config"] for r in chosen))
    backends = list(OrderedDict.fromkeys(r["backend"] for r in chosen))
    cell = {(r["backend"], r["config"]): r for r in chosen}
    lines = [f"{mode}, microseconds per step (median); in brackets: speedup vs the reference", "",
             "| backend | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
    for backend in backends:
        cells = []
        for config in configs:
            r = cell.get((backend, config))
            if r is None or r["median_ms"] is None:
                cells.append("-" if r is None else r["check"])
            else:
                ratio = r.get("speedup_vs_reference")
                cells.append(f"{r['ms_per_step'] * 1e3:.0f}" + (f" ({ratio:.1f}x)" if ratio and backend != "reference"
                                                                  else ""))
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """`python -m zoneout_fused.bench.report RESULT.json... [-o OUT.md]`: the markdown of saved results."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m zoneout_fused.bench.report", description=main.__doc__)
    parser.add_argument("json", nargs="+")
    parser.add_argument("-o", "--output", default=None, help="default: stdout")
    parser.add_argument("--pivot", action="store_true", help="one compact table: us/step, backend x case")
    parser.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"), help="for --pivot")
    opts = parser.parse_args(argv)
    parts = []
    for path in opts.json:
        with open(path) as source:
            records = json.load(source)["records"]
        parts.append(pivot(records, opts.mode) if opts.pivot else markdown(records))
    text = "\n".join(parts)
    if opts.output:
        with open(opts.output, "w") as out:
            out.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
