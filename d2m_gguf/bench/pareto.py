"""The Pareto front of a matrix at one context depth: which rows no other row beats on both quality and speed.

A row is a (model, weight type, KV-cache type) a user could run. At depth 0 its quality is the short-context
perplexity; deeper, the long-context one (the matrix says which ctx), its speed the decode tok/s measured at
that depth. `front_rows` marks the front, `headline` says in one sentence which methods are on it, and
`plot_front` draws it (one colour per method, one marker per KV-cache type, the frontier joined).
"""

from __future__ import annotations

from pathlib import Path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both speed (x, higher) and quality (y, lower)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def num(x) -> float | None:
    """A table cell as a number (None for empty or text cells)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def measured(rows: list[dict], speed: str, quality: str) -> list[int]:
    """Indices of the good rows that have both numbers."""
    return [i for i, r in enumerate(rows) if r.get("status") == "ok" and num(r.get(speed)) and num(r.get(quality))]


def front_rows(rows: list[dict], speed: str, quality: str) -> list[int]:
    """Indices (into `rows`) of the front, fastest first."""
    idx = measured(rows, speed, quality)
    front = pareto_front([(num(rows[i][speed]), num(rows[i][quality])) for i in idx])
    return sorted((idx[j] for j in front), key=lambda i: -num(rows[i][speed]))


def row_label(r: dict) -> str:
    """`variant quant` plus the KV-cache type when it is not the default f16."""
    kv = r.get("kv", "f16")
    return f"{r['variant']} {r['quant']}" + (f" + KV {kv}" if kv and kv != "f16" else "")


def method_label(r: dict) -> str:
    """The method a row stands for: its series, plus a quantized KV cache (itself an alternative a user picks)."""
    kv = r.get("kv", "f16")
    return r["series"] + (f" + KV {kv}" if kv and kv != "f16" else "")


def headline(rows: list[dict], depth: int, speed: str, quality: str, quality_name: str) -> str:
    """One sentence: which methods are on the front at this depth (and which are not), fastest row first."""
    idx = measured(rows, speed, quality)
    if not idx:
        return f"Depth {depth}: no row was measured."
    front = front_rows(rows, speed, quality)
    on = list(dict.fromkeys(method_label(rows[i]) for i in front))
    off = [s for s in dict.fromkeys(method_label(rows[i]) for i in idx) if s not in on]
    best = rows[front[-1]]
    fastest = rows[front[0]]
    return (f"Depth {depth} ({quality_name}): on the front are {', '.join(on)} ({len(front)} of {len(idx)} rows; "
            f"fastest {row_label(fastest)} at {num(fastest[speed]):.1f} tok/s and ppl {num(fastest[quality]):.2f}, "
            f"best quality {row_label(best)} at {num(best[speed]):.1f} tok/s and ppl {num(best[quality]):.2f})"
            + (f"; {', '.join(off)} {'is' if len(off) == 1 else 'are'} not." if off else "."))


MARKERS = {"f16": "o", "q8_0": "s", "q4_0": "^"}


def plot_front(rows: list[dict], path: Path, depth: int, speed: str, quality: str, quality_name: str) -> None:
    """quality against measured decode tok/s at `depth`: one colour per method, one marker per KV-cache type,
    the front joined and circled, each point named by its weight type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9, 6))
    idx = measured(rows, speed, quality)
    series = list(dict.fromkeys(rows[i]["series"] for i in idx))
    colours = {s: plt.get_cmap("tab10")(k % 10) for k, s in enumerate(series)}
    for i in idx:
        r = rows[i]
        x, y = num(r[speed]), num(r[quality])
        ax.scatter([x], [y], color=colours[r["series"]], marker=MARKERS.get(r.get("kv", "f16"), "D"), s=40,
                   alpha=0.85)
        ax.annotate(r["quant"], (x, y), fontsize=7, alpha=0.75, xytext=(4, 3), textcoords="offset points")
    if idx:
        front = front_rows(rows, speed, quality)
        xs, ys = [num(rows[i][speed]) for i in front], [num(rows[i][quality]) for i in front]
        ax.plot(xs, ys, "k--", lw=1)
        ax.scatter(xs, ys, s=140, facecolors="none", edgecolors="k", lw=1.2)
        ys_all = [num(rows[i][quality]) for i in idx]
        if max(ys_all) / max(1e-9, min(ys_all)) > 20:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no row measured at this depth", ha="center", transform=ax.transAxes)
    handles = [Line2D([], [], color=colours[s], marker="o", ls="", label=s) for s in series]
    kvs = list(dict.fromkeys(rows[i].get("kv", "f16") for i in idx))
    handles += [Line2D([], [], color="grey", marker=MARKERS.get(k, "D"), ls="", label=f"KV cache {k}") for k in kvs]
    handles.append(Line2D([], [], color="k", ls="--", marker="o", mfc="none", label="Pareto front"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel(f"measured decode tok/s at context depth {depth} (this machine)")
    ax.set_ylabel(f"{quality_name} (lower is better)")
    ax.set_title(f"quality vs decode speed at depth {depth}: up and to the left is worse")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["pareto_front", "front_rows", "headline", "method_label", "plot_front", "row_label", "num", "measured"]
