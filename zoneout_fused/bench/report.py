"""Tables of benchmark records: plain text for the terminal, markdown for the README."""
from __future__ import annotations

from collections import OrderedDict

MODE_ORDER = ("eval", "fwd", "fwd+bwd")
SHORT = {"eval": "eval", "fwd": "fwd", "fwd+bwd": "f+b"}


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


def _modes(records: list[dict]) -> list[str]:
    present = {r["mode"] for r in records}
    return [m for m in MODE_ORDER if m in present]


def columns(records: list[dict]) -> tuple:
    """backend, check, time per mode, us/step, memory, then speedups against the plain loop
    (what users run today), the no-zoneout ceiling and the reference, per mode."""
    modes = _modes(records)
    baseline = next((r.get("baseline") for r in records if r.get("baseline")), "nn.LSTM")
    last = SHORT[modes[-1]] if modes else "f+b"
    return (("backend", "check") + tuple(f"{m} ms" for m in modes) + (f"{last} us/step", "peak MB")
            + tuple(f"vs plain loop {SHORT[m]}" for m in modes) + tuple(f"vs {baseline} {SHORT[m]}" for m in modes)
            + tuple(f"vs ref {SHORT[m]}" for m in modes))


def rows(records: list[dict]) -> list[tuple]:
    """One row per backend (its modes merged), in the records' order."""
    modes = _modes(records)
    by_backend: "OrderedDict[str, dict]" = OrderedDict()
    for record in records:
        by_backend.setdefault(record["backend"], {})[record["mode"]] = record
    out = []
    for backend, by_mode in by_backend.items():
        last = by_mode.get(modes[-1], {}) if modes else {}
        any_record = next(iter(by_mode.values()))
        per_step = last.get("ms_per_step")
        out.append((backend, any_record["check"]) + tuple(_ms(by_mode.get(m, {}).get("median_ms")) for m in modes)
                   + ("-" if per_step is None else f"{per_step * 1e3:.0f}", _mb(last.get("peak_mem_mb")))
                   + tuple(_ratio(by_mode.get(m, {}).get("speedup_vs_plain_loop")) for m in modes)
                   + tuple(_ratio(by_mode.get(m, {}).get("speedup_vs_nn_lstm")) for m in modes)
                   + tuple(_ratio(by_mode.get(m, {}).get("speedup_vs_reference")) for m in modes))
    return out


def floor_line(records: list[dict]) -> str:
    """The matrix-product floor of the case per mode (each record also holds floor_fraction)."""
    parts = []
    for mode in _modes(records):
        floor = next((r.get("floor_ms") for r in records if r["mode"] == mode and r.get("floor_ms")), None)
        if floor is None:
            continue
        parts.append(f"{mode} {_ms(floor)} ms")
    return ("matrix-product floor (the case's products on the fastest engine here, torch.mm or oneDNN, same run): " + ", ".join(parts)) if parts else ""


def rounds_line(records: list[dict]) -> str:
    """Per backend and mode, the quartiles of the baseline's time / the row's time round by round
    (speedup_vs_nn_lstm_rounds): how far the speedup column moves with the machine's phases."""
    baseline = next((r.get("baseline") for r in records if r.get("baseline")), "nn.LSTM")
    by_backend: "OrderedDict[str, list]" = OrderedDict()
    for record in records:
        rounds = record.get("speedup_vs_nn_lstm_rounds")
        if rounds and record["backend"] != baseline:
            by_backend.setdefault(record["backend"], []).append(
                (MODE_ORDER.index(record["mode"]), f"{SHORT[record['mode']]} {rounds[0]:.2f}-{rounds[2]:.2f}"))
    if not by_backend:
        return ""
    parts = [f"{backend} " + ", ".join(text for _, text in sorted(modes)) for backend, modes in by_backend.items()]
    return (f"vs {baseline}, round by round (its time / the row's, both timed in the same round; lower to upper "
            "quartile): " + "; ".join(parts))


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
    body, head = rows(records), columns(records)
    widths = [max(len(str(row[i])) for row in body + [head]) for i in range(len(head))]
    fmt = lambda row: "  ".join(str(cell).ljust(w) if i < 2 else str(cell).rjust(w)  # noqa: E731
                                for i, (cell, w) in enumerate(zip(row, widths)))
    z = ", ".join(f"{k}={v}" for k, v in zoneout_kwargs.items())
    lines = [f"\n== {case.describe()}  {dtype_name}  [{z}]", fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in body]
    lines += ["  " + line for line in [floor_line(records), rounds_line(records)] + notes(records) if line]
    return "\n".join(lines)


def _isa(record: dict) -> str:
    """", instruction sets ..." for CPU runs that recorded them."""
    return f", instruction sets: {record['instruction_sets']}" if record.get("instruction_sets") else ""


def _heap(record: dict) -> str:
    """" Heap: ..." for CPU runs that recorded how glibc's thresholds were set."""
    return f" Heap: {record['heap']}." if record.get("heap") else ""


def markdown(records: list[dict]) -> str:
    """A README-ready table per (case, dtype), with the machine and commit above them."""
    if not records:
        return "(no records)\n"
    first = records[0]
    commit = (first.get("commit") or "unknown")[:12] + (" + local changes" if first.get("commit_dirty") else "")
    lines = [f"Device: {first['device']}, torch {first['torch']}, triton {first['triton']}, commit {commit}, "
             f"torch threads {first.get('threads') or '-'}{_isa(first)}{_load(records)}. Medians of {max(r['repeats'] for r in records)} interleaved runs "
             f"after {first['warmup']} warm-up; \"vs\" columns are speedups (time of the peer / time of the row). "
             f"Peak memory: {first['peak_mem_method']}.{_heap(first)}", ""]
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for record in records:
        groups.setdefault((record["config"], record["dtype"]), []).append(record)
    for (config, dtype), group in groups.items():
        r = group[0]
        head = columns(group)
        lines += [f"**{config}** (B={r['batch']}, T={r['steps']}, I={r['input_size']}, H={r['hidden_size']}, "
                  f"layers={r['num_layers']}{', bidirectional' if r.get('bidirectional') else ''}"
                  f"{', cell stepped T times' if r.get('cell') else ''}, "
                  + (f"z_c={r['zoneout_cell']}, " if r.get("zoneout_cell") is not None else f"{r.get('rnn_cell')}, ")
                  + f"z_h={r['zoneout_hidden']}, {dtype})", "",
                  "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows(group)]
        errors = [n for n in notes(group) if ": check " not in n]
        summary = [line for line in (floor_line(group), rounds_line(group)) if line]
        lines += [""] + [f"- {n}" for n in summary + errors] + [""]
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
    parser.add_argument("--mode", default="fwd+bwd", choices=MODE_ORDER, help="for --pivot")
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
