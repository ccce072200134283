"""The open-loop part of docs/benchmarks.md: its own marked section, a plot, the cost split.

``python -m bench --open-loop`` rewrites only the text between `BEGIN` and `END`
(adding the section if it is missing), and the closed-loop report keeps that section when it
rewrites the rest: either command refreshes its own figures and leaves the other's alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .openloop import (
    GENERATOR_LAG_MS,
    HELD_DELIVERED_FRACTION,
    HELD_P99_MS,
    OpenLoopResult,
    fit_cost_split,
    verdict,
)
from .servers import SERVERS

BEGIN = "<!-- open-loop:begin (python -m bench --open-loop writes this section) -->"
END = "<!-- open-loop:end -->"
SCENARIO_TITLES = {"dense": "Dense: one room", "rooms": "Many small rooms"}


def _num(value: float, fmt: str = ",.0f") -> str:
    return "—" if value is None or math.isnan(value) else format(value, fmt)


def _cell(result: OpenLoopResult) -> str:
    """One load of one server, as the issue's table has it: CPU, verdict, p99 or rate."""
    if result.error and not result.sent:
        return result.error
    text = f"{_num(result.cpu_us_per_delivery, '.1f')} µs, {verdict(result)}"
    notes = [f"p99 {_num(result.p99_ms, '.1f')} ms"]
    if result.deliveries_per_s < HELD_DELIVERED_FRACTION * result.offered:
        notes.append(f"{_num(result.deliveries_per_s)}/s delivered")
    if result.lost:
        notes.append(f"**lost {result.lost}**")
    return text + f" ({', '.join(notes)})"


def highest_held(results: Sequence[OpenLoopResult], server: str, scenario: str) -> str:
    """The highest offered load held, and whether the generator kept up above it."""
    runs = sorted(
        (r for r in results if r.server == server and r.scenario == scenario),
        key=lambda r: r.offered,
    )
    if not runs:
        return "—"
    if all(r.error and not r.sent for r in runs):
        return runs[0].error
    held = [r for r in runs if r.held and not r.generator_behind]
    best = max((r.offered for r in held), default=None)
    behind = [r.offered for r in runs if r.generator_behind and (best is None or r.offered > best)]
    if best is None and behind and min(behind) == runs[0].offered:
        return f"inconclusive (generator fell behind at {runs[0].offered:,.0f}/s)"
    text = f"**{best:,.0f}/s**" if best is not None else f"none (lowest {runs[0].offered:,.0f}/s)"
    if behind:
        text += f" (generator fell behind at {min(behind):,.0f}/s: inconclusive above)"
    return text


def _servers(results: Sequence[OpenLoopResult]) -> list[str]:
    return list(dict.fromkeys(r.server for r in results))


def held_table(results: Sequence[OpenLoopResult]) -> str:
    scenarios = [s for s in SCENARIO_TITLES if any(r.scenario == s for r in results)]
    if not scenarios:
        return ""
    head = "| server | " + " | ".join(_scenario_label(results, s) for s in scenarios) + " |\n"
    head += "|---|" + "---|" * len(scenarios) + "\n"
    rows = [
        f"| {server} | " + " | ".join(highest_held(results, server, s) for s in scenarios) + " |"
        for server in _servers(results)
    ]
    return head + "\n".join(rows) + "\n"


def _scenario_label(results: Sequence[OpenLoopResult], scenario: str) -> str:
    run = next(r for r in results if r.scenario == scenario)
    if run.rooms == 1:
        return f"dense ({run.clients:,} subscribers in one room)"
    return (
        f"rooms ({run.clients:,} subscribers in {run.rooms} rooms of {run.clients / run.rooms:.0f})"
    )


def load_table(results: Sequence[OpenLoopResult], scenario: str) -> str:
    """Loads down, servers across: CPU µs per delivery and the verdict at each load."""
    runs = [r for r in results if r.scenario == scenario]
    servers = _servers(runs)
    loads = sorted({r.offered for r in runs})
    head = "| offered deliveries/s (messages/s) | " + " | ".join(servers) + " |\n"
    head += "|---|" + "---|" * len(servers) + "\n"
    rows = []
    for load in loads:
        at = {r.server: r for r in runs if r.offered == load}
        rate = next(r.offered_msgs_per_s for r in runs if r.offered == load)
        cells = [_cell(at[s]) if s in at else "—" for s in servers]
        rows.append(f"| {load:,.0f} ({rate:,.0f}) | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def detail_table(results: Sequence[OpenLoopResult]) -> str:
    head = (
        "| scenario | server | rooms | offered/s | runs | sent | delivered/s | p50 ms | p99 ms |"
        " lost | dup | out of order | wrong room | CPU µs/delivery (min-max) |"
        " sender lag p99 ms | receiver loop lag p99 ms | receiver CPU | verdict |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for r in results:
        cpu = _num(r.cpu_us_per_delivery, ".1f")
        if r.runs > 1:
            cpu += f" ({_num(r.cpu_us_min, '.1f')}-{_num(r.cpu_us_max, '.1f')})"
        status = verdict(r)
        if not r.drained and not r.error:
            status += "; not drained"
        if r.failed_runs:
            status += f"; {r.failed_runs} runs failed, left out"
        rows.append(
            f"| {r.scenario} | {r.server} | {r.rooms} | {r.offered:,.0f} | {r.runs} | {r.sent} |"
            f" {_num(r.deliveries_per_s)} | {_num(r.p50_ms, '.1f')} | {_num(r.p99_ms, '.1f')} |"
            f" {r.lost} | {r.duplicates} | {r.out_of_order} | {r.wrong_room} | {cpu} |"
            f" {_num(r.sender_lag_p99_ms, '.1f')} | {_num(r.receiver_lag_p99_ms, '.1f')} |"
            f" {_num(r.receiver_cpu_busy * 100, '.0f')}% | {status} |"
        )
    return head + "\n".join(rows) + "\n"


def split_table(results: Sequence[OpenLoopResult]) -> str:
    """Per server: µs per publish and per frame written, fitted over the room sizes."""
    runs = [r for r in results if r.scenario == "split"]
    if not runs:
        return ""
    head = (
        "| server | µs per publish | µs per delivery (frame written) | fit RMS residual |"
        " runs: room size → CPU µs per delivery, verdict |\n|---|---:|---:|---:|---|\n"
    )
    rows = []
    for server in _servers(runs):
        mine = sorted((r for r in runs if r.server == server), key=lambda r: -r.rooms)
        fit = fit_cost_split(mine)
        detail = ", ".join(
            f"{r.clients / r.rooms:.0f} → {_num(r.cpu_us_per_delivery, '.1f')}, {verdict(r)}"
            for r in mine
        )
        if fit is None:
            rows.append(f"| {server} | — | — | — | {detail or 'no runs'} (too few runs to fit) |")
            continue
        a, b, rms = fit
        if a < 0 or b < 0:
            # Two costs cannot be negative: the runs disagree with the model (noise, or
            # batching that changes the cost per delivery with the message rate).
            detail += "; **a negative cost: the runs do not fit the model**"
        rows.append(f"| {server} | {a:.1f} | {b:.1f} | {rms * 100:.0f}% | {detail} |")
    return head + "\n".join(rows) + "\n"


def plot(results: Sequence[OpenLoopResult], path: Path) -> bool:
    """p99 latency against offered load, one line per server, one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in SCENARIO_TITLES if any(r.scenario == s and r.sent for r in results)]
    if not scenarios:
        return False
    fig, panels = plt.subplots(1, len(scenarios), figsize=(5.5 * len(scenarios), 4.2))
    if len(scenarios) == 1:
        panels = [panels]
    for axes, scenario in zip(panels, scenarios, strict=True):
        runs = [r for r in results if r.scenario == scenario and r.sent and not r.error]
        for server in _servers(runs):
            mine = sorted((r for r in runs if r.server == server), key=lambda r: r.offered)
            (line,) = axes.plot(
                [r.offered / 1000 for r in mine], [r.p99_ms for r in mine], marker="o", label=server
            )
            behind = [r for r in mine if r.generator_behind]
            if behind:
                axes.plot(
                    [r.offered / 1000 for r in behind],
                    [r.p99_ms for r in behind],
                    linestyle="none",
                    marker="x",
                    markersize=10,
                    color=line.get_color(),
                )
        axes.axhline(HELD_P99_MS, color="grey", linestyle="--", linewidth=1)
        axes.set(
            title=f"{SCENARIO_TITLES[scenario]} ({_scenario_label(results, scenario)})",
            xlabel="offered load, thousand deliveries/s",
            ylabel="p99 latency, ms (log)",
        )
        axes.title.set_fontsize(9)
        axes.set_yscale("log")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def section(
    results: Sequence[OpenLoopResult] | None,
    *,
    command: str,
    elapsed: float,
    png_name: str | None,
    note: str = "",
) -> str:
    """The whole marked section; ``results`` None: a placeholder until the quiet run."""
    parts = [BEGIN, "## Open loop: latency at a fixed load, and the highest load held\n"]
    if results is None:
        parts.append(
            "**Figures to be filled by the quiet run** (`python -m bench --open-loop"
            " --time-budget 3600` on an otherwise idle machine): none of this section's figures"
            " has been measured on a quiet machine yet.\n"
        )
    else:
        parts.append(
            f"Written by `{command}` in {elapsed:.0f} s; do not edit by hand (rerun it)."
            " Medians of the repetitions; CPU is the server's own, per delivery to a"
            " subscriber.\n"
        )
        if note:
            parts.append(note + "\n")
        parts += ["### Highest load held\n", held_table(results)]
        for scenario, title in SCENARIO_TITLES.items():
            if any(r.scenario == scenario for r in results):
                parts += [f"### {title}\n", load_table(results, scenario)]
        if png_name:
            parts.append(f"![p99 latency against offered load, per server]({png_name})\n")
        split = split_table(results)
        if split:
            parts += ["### Cost per publish and per delivery\n", split, split_method(results)]
        parts += ["### Every open-loop run\n", detail_table(results)]
    parts += ["### How the open loop measures\n", METHOD, HOW_TO_RUN, END]
    return "\n".join(parts) + "\n"


def replace_section(path: Path, text: str) -> None:
    """Put ``text`` (a whole marked section) into ``path`` in place of the old one; add it
    before ``## Servers`` (or at the end) if there is none; create the file if need be."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in old and END in old:
        before, rest = old.split(BEGIN, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        new = before + text + ("\n" + after if after else "")
    elif "\n## Servers\n" in old:
        before, after = old.split("\n## Servers\n", 1)
        new = before.rstrip("\n") + "\n\n" + text + "\n## Servers\n" + after
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def existing_section(path: Path) -> str | None:
    """The marked open-loop section of ``path``, if it has one (kept by the closed loop)."""
    if not path.exists():
        return None
    text = path.read_text()
    if BEGIN not in text or END not in text:
        return None
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"


def servers_lines(names: Sequence[str]) -> str:
    return "\n".join(f"- **{name}**: {SERVERS[name].description}" for name in names) + "\n"


METHOD = f"""\
- **Load** is offered in **deliveries per second** (frames to subscribers), the unit of the
  issue's table: the sender sends `load / (subscribers per room)` messages per second,
  dealt round-robin over the rooms. Dense: 500 subscribers in one room (50k/s = 100
  messages/s); rooms: 1,000 subscribers in 50 rooms of 20 (10k/s = 500 messages/s). Each
  load runs `--load-seconds` (5) against a freshly started server, `--repeat` (3) times.
- **Open loop**: message i is due at `start + i / rate`. The sender wakes at most once a
  millisecond, writes every message that is due (one write per room's connection; batching
  keeps the generator cheap) stamped with the time of that write, and never waits for
  anything the server sends: its own copies (every server writes a message back to its
  sender too) are read and dropped as they come, so they cannot pace it.
- **Latency** = a subscriber's receive time (one clock reading per chunk read from the socket)
  minus the send stamp, on the machine's one clock. **Deliveries/s** = frames delivered to
  subscribers / (last receive - first send). **Lost** = messages of a subscriber's room it
  had not received when the run ended: after the last send the subscribers wait until they
  have everything, or 1.5 s pass without a frame, or `--drain-timeout` (10 s) passes.
- **Held** = nothing lost, at least {HELD_DELIVERED_FRACTION:.0%} of the offered
  deliveries/s delivered, and p99 ≤ {HELD_P99_MS:.0f} ms; the **highest load held** is the
  highest offered load whose median row was held.
- **CPU per delivery** = the server process's user + system CPU (`/proc/<pid>/stat`, all its
  threads) from the first send to the last report, divided by the deliveries to subscribers.
- **The generator is measured too**. The subscribers (and the sender) are not the
  `websockets` client of the closed loop but a minimal client on an asyncio `Protocol`
  (`bench/rawws.py`: frames parsed in place, a few µs per received frame) in
  `--client-procs` processes (default one per 250 subscribers, at most one per core), with
  uvloop. Each subscriber process measures its event-loop lag (how late a 5 ms timer fires,
  which is how long a frame that arrived can wait before it is stamped) and its CPU; the
  sender measures how late each batch went out against its schedule. If the sender's or any
  subscriber process's p99 lag exceeds {GENERATOR_LAG_MS:.0f} ms, the run says **generator
  fell behind** instead of held or not held: on 2 cores shared with the server, the clients
  were the bottleneck and the figures say nothing sure about the server.
- Bounded: at most 100,000 messages per run, a hard timeout per run, a time budget after which
  no new run starts, 127.0.0.1 only; every process is stopped at the end of its run.
"""


def split_method(results: Sequence[OpenLoopResult]) -> str:
    """How the split was measured, with this run's load, subscribers and room sizes."""
    runs = [r for r in results if r.scenario == "split"]
    loads = sorted({r.offered for r in runs})
    clients = max(r.clients for r in runs)
    sizes = sorted({r.clients // r.rooms for r in runs})
    rooms = sorted({r.rooms for r in runs}, reverse=True)
    return (
        "How: the `split` scenario runs every server at one offered load"
        f" ({', '.join(f'{load:,.0f}' for load in loads)} deliveries/s, `--split-load`) with"
        f" {clients:,} subscribers in rooms of {', '.join(map(str, sizes))} (`--split-sizes`:"
        f" {', '.join(map(str, rooms))} rooms), then fits the server's CPU seconds by least"
        " squares as `a * publishes + b * frames written` (no intercept), frames written ="
        " deliveries to subscribers + the sender's own copies. So **a** is what one message"
        " costs however many receive it (read, parse, validate, order, encode) and **b** what"
        " each recipient adds (queue, write). The residual (RMS of the relative errors) says"
        " how well two numbers explain the runs; CPU is read in clock ticks (10 ms), so short"
        " runs fit poorly.\n"
    )


HOW_TO_RUN = """\
```sh
python -m bench --open-loop --time-budget 3600          # this section and its PNG
python -m bench --open-loop --servers chat,node --open-scenarios dense \\
    --loads 50000,100000 --repeat 1 --out /tmp/open.md  # a part of it, elsewhere
python -m bench --open-loop --smoke                     # seconds; tests/test_bench_open_loop.py
```

Flags: `--loads` (dense), `--rooms-loads`, `--dense-clients`, `--rooms`, `--rooms-clients`,
`--load-seconds`, `--split-sizes`, `--split-load`, `--open-scenarios`, `--drain-timeout`,
`--client-procs`, `--repeat`. Raw numbers: `bench/results/open-loop.json`.
"""
