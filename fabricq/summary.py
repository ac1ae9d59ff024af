"""`python -m fabricq.summary MULTIRUN_DIR`: one table over the jobs of a Hydra sweep.

Columns: the overrides that differ between jobs, method, bits, group size, size on disk (MiB and
ratio to the original model's weight files), perplexity before/after, KL, wall time, peak RSS.
Printed, and written into the sweep directory as summary.md, summary.csv and summary.png (perplexity
and KL against size on disk, one labelled point per job, the original model for reference). A job
without report.json is a failed row.

`SweepSummary` is the Hydra callback (conf/config.yaml, hydra.callbacks) that writes the summary at
the end of every `python -m fabricq -m ...` sweep, and `fabricq.__main__` calls
`summarize_interrupted_sweep` when a sweep stops at a failed job. Both run in the sweep's own
process: jobs with several ranks run as separate process trees (fabricq.runtime), never here.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from fabricq.cli import ArgumentParser, run_command
from fabricq.errors import FabricqError
from fabricq.report_card import (
    MIB,
    effective_group_sizes,
    fmt,
    load_pyplot,
    weight_bytes,
)

SUMMARY_FILES = ("summary.md", "summary.csv", "summary.png")
# The numeric columns after the override columns: (csv name, markdown header, digits).
COLUMNS = [
    ("method", "method", None), ("bits", "bits", None), ("group_size", "group", None),
    ("size_mib", "size MiB", 3), ("size_ratio", "× original", 3),
    ("ppl_before", "ppl before", 4), ("ppl_after", "ppl after", 4), ("kl_after", "KL", 3),
    ("wall_s", "wall s", 3), ("peak_rss_mib", "peak RSS MiB", 4),
]


@dataclass
class SweepJob:
    num: int
    folder: Path
    overrides: dict[str, str] = field(default_factory=dict)
    report: dict | None = None
    status: str = "ok"  # ok / failed (no report.json) / not run (the sweep stopped before it)


def sweep_job_overrides(sweep_dir: Path) -> list[list[str]] | None:
    """Each job's overrides, in job-number order, expanded from multirun.yaml the way Hydra's basic
    sweeper expands them; None when there is no multirun.yaml or another sweeper wrote it."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        hydra = OmegaConf.load(path).hydra
        if "basic_sweeper" not in str(hydra.sweeper.get("_target_", "")):
            return None
        params = [f"{key}={value}" for key, value in (hydra.sweeper.get("params") or {}).items()]
        task = OmegaConf.to_container(hydra.overrides.task)
        parsed = OverridesParser.create().parse_overrides([*params, *task])
        return BasicSweeper.split_arguments(parsed, None)[0]
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml: fall back to the jobs' own configs
        return None


def flat_config(folder: Path) -> dict[str, str]:
    """A job's fabricq_config.yaml as {dotted key: value}; empty when there is none."""
    path = folder / "fabricq_config.yaml"
    if not path.is_file():
        return {}
    flat: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = json.dumps(node, default=str) if isinstance(node, (list, dict)) else str(node)

    try:
        walk(yaml.safe_load(path.read_bytes().decode("utf-8")) or {}, "")
    except (ValueError, RecursionError, yaml.YAMLError):  # not text or not YAML: the job's settings are unknown
        return {}
    flat.pop("output_dir", None)  # differs by construction
    return flat


def collect_jobs(sweep_dir: Path, started: set[int] | None = None) -> list[SweepJob]:
    """The sweep's jobs: those multirun.yaml expands to, and any numbered folder. `started`: job
    numbers the sweep began (None: unknown, every job is taken as run)."""
    expanded = sweep_job_overrides(sweep_dir) or []
    numbers = {int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    numbers |= set(range(len(expanded)))
    jobs = []
    for num in sorted(numbers):
        job = SweepJob(num, sweep_dir / str(num))
        if num < len(expanded):
            job.overrides = {k.lstrip("+~"): v for k, _, v in (o.partition("=") for o in expanded[num])}
        report = job.folder / "report.json"
        if report.is_file():
            try:
                job.report = summary_fields(json.loads(report.read_bytes().decode("utf-8")))
            except (ValueError, RecursionError):  # cut short (disk full), not text, nested absurdly deep
                job.status = "failed (unreadable report.json)"
            else:
                if job.report is None:
                    job.status = "failed (report.json is not a JSON object)"
        elif started is not None and num not in started:
            job.status = "not run"
        else:
            job.status = "failed (no report.json)"
        jobs.append(job)
    if not expanded:  # no multirun.yaml: what differs between the jobs' resolved configs
        for job in jobs:
            job.overrides = flat_config(job.folder)
    return jobs


def _number(value) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_fields(report) -> dict | None:
    """The fields of a job's report.json the summary reads, each of the type it needs (a field of
    another type reads as absent: "—"); None when the report is not a JSON object."""
    if not isinstance(report, dict):
        return None

    def section(name: str) -> dict:
        value = report.get(name)
        return value if isinstance(value, dict) else {}

    scheme, size = section("scheme"), section("size_on_disk")
    modules = {name: {"group_size": stats["group_size"]} for name, stats in section("modules").items()
               if isinstance(stats, dict) and type(stats.get("group_size")) is int}
    return {
        "method": report["method"] if isinstance(report.get("method"), str) else None,
        "scheme": {key: scheme[key] for key in ("bits", "group_size") if type(scheme.get(key)) is int},
        "size_on_disk": {key: size[key] for key in ("checkpoint_bytes", "original_bytes")
                         if type(size.get(key)) is int and size[key] > 0},
        "modules": modules,
        **{key: _number(report.get(key)) for key in ("ppl_before", "ppl_after", "kl_after", "wall_s", "peak_rss_mib")},
    }


def differing_keys(jobs: list[SweepJob]) -> list[str]:
    keys: list[str] = []
    for job in jobs:
        keys += [key for key in job.overrides if key not in keys]
    return [key for key in keys if len({job.overrides.get(key) for job in jobs if job.overrides}) > 1]


def job_values(job: SweepJob, original_bytes: int | None) -> dict:
    """The numeric columns of one job (None where unknown)."""
    report = job.report or {}
    scheme = report.get("scheme") or {}
    size = report.get("size_on_disk") or {}
    checkpoint = size.get("checkpoint_bytes")
    if checkpoint is None and job.report is not None:  # a report from before size_on_disk existed
        checkpoint = weight_bytes(job.folder) or None
    original = size.get("original_bytes") or original_bytes
    effective = "/".join(str(g) for g in effective_group_sizes(report)) or None
    return {
        "method": report.get("method"), "bits": scheme.get("bits"), "group_size": scheme.get("group_size"),
        "effective_group_sizes": effective,
        "size_mib": checkpoint / MIB if checkpoint else None,
        "size_ratio": checkpoint / original if checkpoint and original else None,
        "ppl_before": report.get("ppl_before"), "ppl_after": report.get("ppl_after"),
        "kl_after": report.get("kl_after"), "wall_s": report.get("wall_s"), "peak_rss_mib": report.get("peak_rss_mib"),
    }


def original_size(jobs: list[SweepJob]) -> int | None:
    sizes = [(job.report or {}).get("size_on_disk", {}).get("original_bytes") for job in jobs]
    return next((s for s in sizes if s), None)


def original_ppl(jobs: list[SweepJob]) -> float | None:
    """The original model's perplexity, when every job measured it on the same text."""
    values = {round(job.report["ppl_before"], 6) for job in jobs if job.report and job.report.get("ppl_before")}
    return values.pop() if len(values) == 1 else None


def job_label(job: SweepJob, keys: list[str]) -> str:
    """`#n` and the overrides that differ, keys shortened to their last name when unambiguous."""
    short = [key.rsplit(".", 1)[-1] for key in keys]
    names = [s if short.count(s) == 1 else key for s, key in zip(short, keys)]
    parts = [f"{name}={job.overrides[key]}" for name, key in zip(names, keys) if key in job.overrides]
    return f"#{job.num} " + (", ".join(parts) or job.folder.name)


def markdown_table(jobs: list[SweepJob], keys: list[str], original: int | None) -> list[str]:
    headers = ["job", *keys, "status", *(header for _, header, _ in COLUMNS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * (2 + len(keys)) + "---:|" * len(COLUMNS)]
    for job in jobs:
        values = job_values(job, original)
        cells = [str(job.num), *(job.overrides.get(key, "") for key in keys), job.status]
        cells += [fmt(values[name], digits) if digits else ("—" if values[name] is None else str(values[name]))
                  for name, _, digits in COLUMNS]
        if values["effective_group_sizes"] not in (None, str(values["group_size"])):  # widths fell back
            cells[headers.index("group")] += f" (eff. {values['effective_group_sizes']})"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, jobs: list[SweepJob], keys: list[str], original: int | None) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        names = [name for name, _, _ in COLUMNS] + ["effective_group_sizes"]
        writer.writerow(["job", *keys, "status", *names, "original_mib", "dir"])
        for job in jobs:
            values = job_values(job, original)
            writer.writerow([job.num, *(job.overrides.get(key, "") for key in keys), job.status,
                             *("" if values[name] is None else values[name] for name in names),
                             original / MIB if original else "", job.folder.name])


def plot_summary(path: Path, jobs: list[SweepJob], keys: list[str], original: int | None, plt) -> bool:
    """Perplexity after and KL against size on disk, one point per finished job (distinct colour and
    marker, `#n` beside it, the full label in the legend); the original as a star and a dashed
    line at its perplexity. False when no job has the figures."""
    points = [(job, job_values(job, original)) for job in jobs if job.report]
    # NaN or infinite figures (a diverged job) stay in the table; a plot has no place for them.
    points = [(job, {**v, "ppl_after": _finite(v["ppl_after"]), "kl_after": _finite(v["kl_after"])})
              for job, v in points]
    points = [(job, v) for job, v in points if v["size_mib"] is not None and v["ppl_after"] is not None]
    if not points:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    markers = "ovs^Dp*hX<>"
    reference_ppl = _finite(original_ppl(jobs))
    for i, (job, values) in enumerate(points):
        style = {"marker": markers[i % len(markers)], "color": f"C{i % 10}", "markersize": 8, "linestyle": "none"}
        left.plot(values["size_mib"], values["ppl_after"], label=job_label(job, keys), **style)
        if values["kl_after"] is not None:
            right.plot(values["size_mib"], values["kl_after"], **style)
        for axis, y in ((left, values["ppl_after"]), (right, values["kl_after"])):
            if y is not None:
                axis.annotate(f"#{job.num}", (values["size_mib"], y), textcoords="offset points",
                              xytext=(8, 0), va="center", fontsize=8,  # reference lines pass behind it
                              bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"})
    if original:
        mib = original / MIB
        if reference_ppl is not None:
            left.axhline(reference_ppl, color="tab:gray", linestyle="--", linewidth=1)
            left.plot(mib, reference_ppl, marker="*", color="black", markersize=12, linestyle="none",
                      label=f"original: {mib:.3g} MiB, ppl {reference_ppl:.4g}")
        right.plot(mib, 0.0, marker="*", color="black", markersize=12, linestyle="none")
        right.axhline(0.0, color="tab:gray", linestyle="--", linewidth=1)
    elif reference_ppl is not None:
        left.axhline(reference_ppl, color="tab:gray", linestyle="--", linewidth=1,
                     label=f"original: ppl {reference_ppl:.4g}")
    left.set_ylabel("perplexity after quantization")
    left.margins(y=0.1)  # room for the #n labels at the extremes
    right.set_ylabel("KL(original ‖ quantized), nats per token")
    widest = max([v["size_mib"] for _, v in points] + [original / MIB if original else 0])
    kls = [v["kl_after"] for _, v in points if v["kl_after"] is not None] or [1.0]
    right.set_ylim(-0.05 * max(kls), 1.12 * max(kls))  # KL 0 (the original, W8) stays visible
    for axis in (left, right):
        axis.set_xlabel("size on disk (MiB, weight files)")
        axis.set_xlim(0, widest * 1.12)
        axis.grid(True, alpha=0.3)
    columns = len(points) + 1 if len(points) < 4 else 3
    fig.legend(loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    failed = sum(job.report is None for job in jobs)
    fig.suptitle(f"{path.parent.name}: quality against size, {len(points)} jobs"
                 + (f" ({failed} without report.json, not shown)" if failed else ""), fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_summary(sweep_dir: Path, started: set[int] | None = None, echo: bool = True) -> list[Path]:
    """Write summary.md, summary.csv (and summary.png, with matplotlib) into `sweep_dir`, print the
    table when `echo`; returns the paths written."""
    sweep_dir = Path(sweep_dir)
    jobs = collect_jobs(sweep_dir, started)
    keys = differing_keys(jobs)
    original = original_size(jobs) or fallback_original_size(sweep_dir, jobs)
    table = markdown_table(jobs, keys, original)
    md, csv_path, png = (sweep_dir / name for name in SUMMARY_FILES)
    notes = []
    if original:
        notes.append(f"Original model: {original / MIB:.3g} MiB of weight files"
                     + (f", perplexity {fmt(original_ppl(jobs), 4)}." if original_ppl(jobs) else "."))
    written = [md, csv_path]
    write_csv(csv_path, jobs, keys, original)
    plt = load_pyplot(f"{png.name} (perplexity and KL against size)")
    if plt is not None and plot_summary(png, jobs, keys, original, plt):
        written.append(png)
        notes.append(f"![perplexity and KL against size on disk]({png.name})")
    md.write_text("\n".join([f"# Sweep {sweep_dir.name}", "", *table, "", *notes, ""]))
    if echo:
        print("\n".join(table + [""] + [n for n in notes if not n.startswith("!")]))
        print(f"Wrote {', '.join(str(p) for p in written)}")
    return written


def fallback_original_size(sweep_dir: Path, jobs: list[SweepJob]) -> int | None:
    """For reports older than size_on_disk: the weight files at the jobs' model.path, resolved
    against the directory the sweep ran from (the default model's package is not looked up)."""
    path = next((flat_config(job.folder).get("model.path") for job in jobs if job.report), None)
    if not path or path == "None":
        return None
    for base in (Path.cwd(), sweep_dir.parent.parent):  # multirun/DATE → the sweep's working directory
        folder = (base / path).expanduser()
        if folder.is_dir():
            return weight_bytes(folder) or None
    return None


def is_rank_zero() -> bool:
    """False in the ranks >0 that torchrun or SLURM started, each running the whole sweep."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


_sweep: dict = {}  # the sweep in progress in this process: its directory and the jobs it started


class SweepSummary(Callback):
    """Hydra callback: the summary at the end of a `-m` sweep."""

    def on_multirun_start(self, config, **kwargs) -> None:
        _sweep.update(dir=Path(config.hydra.sweep.dir), started=set())

    def on_job_start(self, config, **kwargs) -> None:
        if "started" in _sweep:
            _sweep["started"].add(int(config.hydra.job.num))

    def on_multirun_end(self, config, **kwargs) -> None:
        summarize_sweep(Path(config.hydra.sweep.dir))


def summarize_sweep(sweep_dir: Path) -> None:
    started = _sweep.get("started")
    _sweep.clear()
    if is_rank_zero() and sweep_dir.is_dir():
        write_summary(sweep_dir, started)


def summarize_interrupted_sweep() -> None:
    """A sweep stopped at a failed job never reaches on_multirun_end: summarize what it ran. Never
    raises (the job's own error is what the user must see)."""
    if "dir" not in _sweep:
        return
    try:
        summarize_sweep(_sweep["dir"])
    except Exception as err:  # noqa: BLE001 - a summary must not hide the job's own error
        print(f"fabricq: could not write the sweep summary: {type(err).__name__}: {err}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fabricq.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. multirun/2025-01-01_12-00-00")
    args = parser.parse_args(argv)

    def body() -> int:
        sweep_dir = Path(args.sweep_dir)
        if not sweep_dir.is_dir():
            raise FabricqError(f"{sweep_dir} is not a directory")
        if not (sweep_dir / "multirun.yaml").is_file() and not any(
                p.is_dir() and p.name.isdigit() for p in sweep_dir.iterdir()):
            raise FabricqError(f"{sweep_dir} holds no multirun.yaml and no numbered job folders: "
                               "pass a `python -m fabricq -m` sweep directory (multirun/DATE)")
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        write_summary(sweep_dir)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
