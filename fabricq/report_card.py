"""`report.md` beside report.json: the headline figures of a run, and `report.png`, the GPTQ
objective of every decoder layer against round-to-nearest's on the same Hessian.

matplotlib draws headless (Agg). Without it the run still succeeds: report.md is written without
the image and one log line says how to get it. Also home of the size-on-disk helpers that
report.json's `size_on_disk` and `python -m fabricq.summary` share.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("fabricq")

REPORT_MD = "report.md"
REPORT_PNG = "report.png"
MIB = 1024 * 1024
# Files that hold a checkpoint's tensors; tokenizer and config files are left out of "size on disk".
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Layer index and the module path inside the layer: "model.layers.3.mlp.down_proj" → 3, "mlp.down_proj".
LAYER_MODULE = re.compile(r"\.(\d+)\.([^\d].*)$")


def weight_bytes(folder: Path, gguf_file: str | None = None) -> int:
    """Bytes of a model folder's weight files (top level only: a `gptq/` copy beside a
    compressed-tensors checkpoint is a second checkpoint, not part of the first)."""
    folder = Path(folder)
    if gguf_file:
        return (folder / gguf_file).stat().st_size
    files = [f for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    return sum(f.stat().st_size for f in (safetensors or files))  # .bin beside .safetensors: a duplicate


def disk_sizes(source, checkpoint_dir: Path) -> dict:
    """report.json's `size_on_disk`: the original model's weight files (`source`, a
    fabricq.models.ModelSource) and the written checkpoint's, in bytes."""
    original = weight_bytes(source.folder, source.gguf_file)
    checkpoint = weight_bytes(checkpoint_dir)
    return {"original_bytes": original, "checkpoint_bytes": checkpoint,
            "ratio": checkpoint / original if original else None}


def load_pyplot(purpose: str):
    """matplotlib's pyplot on the headless Agg backend, or None (and one log line) when matplotlib
    is not installed: the run's other outputs must not depend on it."""
    try:
        import matplotlib
    except ImportError:
        log.warning("%s not drawn: matplotlib is not installed (pip install matplotlib)", purpose)
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def fmt(value, digits: int = 3) -> str:
    """A number for a table: `digits` significant figures, '—' when absent."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def layer_losses(modules: dict) -> dict[str, dict[int, tuple[float, float]]]:
    """GPTQ and round-to-nearest objectives summed per module kind (the module's last name, so the
    experts of a mixture-of-experts layer add up) and decoder layer: {kind: {layer: (gptq, rtn)}}.
    Modules without both objectives (the rtn method records none) are left out."""
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for name, stats in modules.items():
        match = LAYER_MODULE.search(name)
        if match is None or stats.get("loss") is None or stats.get("rtn_loss") is None:
            continue
        kind = match.group(2).rsplit(".", 1)[-1]
        sums = table[kind][int(match.group(1))]
        sums[0] += stats["loss"]
        sums[1] += stats["rtn_loss"]
    return {kind: {layer: tuple(v) for layer, v in sorted(by_layer.items())} for kind, by_layer in table.items()}


def plot_layer_losses(losses: dict, title: str, path: Path, plt) -> None:
    """Two panels over the decoder layers: both objectives summed over the layer (log scale), and
    the GPTQ / RTN ratio of each module kind (below 1: GPTQ removed that share of RTN's error)."""
    layers = sorted({layer for by_layer in losses.values() for layer in by_layer})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, constrained_layout=True)
    gptq = [sum(by_layer.get(i, (0, 0))[0] for by_layer in losses.values()) for i in layers]
    rtn = [sum(by_layer.get(i, (0, 0))[1] for by_layer in losses.values()) for i in layers]
    top.plot(layers, rtn, "s--", color="tab:gray", label="round-to-nearest")
    top.plot(layers, gptq, "o-", color="tab:blue", label="GPTQ")
    top.set_yscale("log")
    plain = plt.FuncFormatter(lambda value, _: f"{value:g}")  # 3, not 3×10⁰
    top.yaxis.set_major_formatter(plain)
    low, high = min(gptq + rtn), max(gptq + rtn)
    if low > 0 and high / low < 10:  # within a decade the powers of ten alone leave the axis bare
        top.yaxis.set_minor_formatter(plain)
        top.tick_params(axis="y", which="minor", labelsize=8)
    top.set_ylabel("tr((W−Q)H(W−Q)ᵀ), sum over\nthe layer's modules (log scale)")
    top.legend(loc="best", fontsize=9)
    top.set_title(title, fontsize=10)
    markers, highest = "ovs^Dp*hX<>", 1.0
    for i, (kind, by_layer) in enumerate(losses.items()):  # the layer's own order: q, k, v, o, …
        xs = [layer for layer, (_, r) in by_layer.items() if r > 0]
        ys = [by_layer[layer][0] / by_layer[layer][1] for layer in xs]
        bottom.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1, markersize=5, label=kind)
        highest = max([highest, *ys])
    bottom.axhline(1.0, color="tab:gray", linestyle="--", linewidth=1)
    bottom.set_ylim(0, highest * 1.05)
    bottom.set_ylabel("GPTQ loss / RTN loss\n(1 = no better than RTN)")
    bottom.set_xlabel("decoder layer")
    bottom.legend(title="module", fontsize=8, title_fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    bottom.xaxis.set_major_locator(plt.MaxNLocator(nbins=min(len(layers), 16), integer=True))  # readable
    for axis in (top, bottom):
        axis.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def effective_group_sizes(report: dict) -> list[int]:
    """The group sizes the modules were quantized with, most common first."""
    counts: dict[int, int] = defaultdict(int)
    for stats in (report.get("modules") or {}).values():
        if stats.get("group_size") is not None:
            counts[stats["group_size"]] += 1
    return sorted(counts, key=lambda g: -counts[g])


def scheme_text(report: dict) -> str:
    scheme = report.get("scheme") or {}
    if not scheme:
        return "—"
    group = scheme.get("group_size")
    grouping = "per channel" if group == -1 else f"groups of {group}"
    effective = effective_group_sizes(report)
    if effective and effective != [group]:  # widths the requested size does not divide fell back
        grouping += f" (effective: {', '.join('per channel' if g == -1 else str(g) for g in effective)})"
    return (f"{scheme.get('method', report.get('method', '?'))} int{scheme.get('bits')}, {grouping}, "
            f"{'symmetric' if scheme.get('symmetric') else 'asymmetric'}, act-order {scheme.get('actorder')}")


def headline_rows(report: dict) -> list[tuple[str, str]]:
    size = report.get("size_on_disk") or {}
    rows = [("model", str(report.get("model", "—"))), ("scheme", scheme_text(report))]
    calibration = report.get("calibration") or {}
    if calibration:
        rows.append(("calibration", f"{calibration.get('samples')} × {calibration.get('seq_len')} tokens"))
    rows += [
        ("perplexity before", fmt(report.get("ppl_before"), 4)),
        ("perplexity after", fmt(report.get("ppl_after"), 4)),
        ("KL after (nats/token)", fmt(report.get("kl_after"), 3)),
    ]
    if size:
        ratio = fmt(size.get("ratio"), 3)
        rows.append(("size on disk", (f"{size['checkpoint_bytes'] / MIB:.3g} MiB of weight files "
                                      f"({ratio} × the original's {size['original_bytes'] / MIB:.3g} MiB)")))
    rows += [("wall time", f"{report['wall_s']:.1f} s" if "wall_s" in report else "—"),
             ("peak RSS", f"{report['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in report else "—")]
    return rows


def write_report_card(folder: Path, report: dict) -> Path:
    """Write report.md (and report.png when there are per-module losses and matplotlib) into
    `folder`, the directory that holds report.json. Returns report.md's path."""
    folder = Path(folder)
    lines = [f"# fabricq report: {report.get('model', 'model')}", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in headline_rows(report)]
    timings = report.get("timings") or {}
    if timings:
        lines += ["", "## Timings", "", "| phase | seconds |", "| --- | ---: |"]
        lines += [f"| {name.removesuffix('_s')} | {seconds:.2f} |" for name, seconds in timings.items()]
    losses = layer_losses(report.get("modules") or {})
    lines += ["", "## Per-layer error", ""]
    if not losses:
        lines.append("No per-module GPTQ objectives in this run (the rtn method records none).")
    else:
        lines += ["Sum over layers of tr((W−Q)H(W−Q)ᵀ), GPTQ and round-to-nearest (RTN) on the same Hessian:", "",
                  "| module | GPTQ | RTN | GPTQ / RTN |", "| --- | ---: | ---: | ---: |"]
        for kind, by_layer in losses.items():
            gptq, rtn = sum(v[0] for v in by_layer.values()), sum(v[1] for v in by_layer.values())
            lines.append(f"| {kind} | {fmt(gptq)} | {fmt(rtn)} | {fmt(gptq / rtn if rtn else None)} |")
        plt = load_pyplot(f"{REPORT_PNG} (per-layer GPTQ vs RTN loss)")
        drawn = False
        if plt is not None:
            title = f"{report.get('model', '')}\n{scheme_text(report)}"  # two lines: long names fit
            try:
                plot_layer_losses(losses, title, folder / REPORT_PNG, plt)
                drawn = True
            except Exception as err:  # noqa: BLE001 - a figure must never fail a finished quantization
                log.warning("%s not drawn: %s: %s", REPORT_PNG, type(err).__name__, err)
        if drawn:
            lines += ["", f"![GPTQ vs RTN loss per decoder layer]({REPORT_PNG})"]
        elif plt is None:
            lines += ["", f"(No {REPORT_PNG}: matplotlib is not installed; `pip install matplotlib` draws it.)"]
    lines += ["", "All figures: report.json in this directory.", ""]
    path = folder / REPORT_MD
    path.write_text("\n".join(lines))
    return path


def write_report_files(folder: Path, report: dict, cfg, source=None) -> None:
    """What every output folder holds beside its checkpoint: report.json (with `size_on_disk` when
    the original model's `source` is known), report.md (+ report.png) and the resolved config."""
    from omegaconf import OmegaConf

    folder = Path(folder)
    if source is not None:
        report["size_on_disk"] = disk_sizes(source, folder)  # weight files: original vs written
    from fabricq.strict_json import dumps

    (folder / "report.json").write_text(dumps(report, indent=2))  # strict JSON: a non-finite figure is null + reason
    write_report_card(folder, report)
    (folder / "fabricq_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
