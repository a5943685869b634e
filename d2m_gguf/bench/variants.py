"""The models a benchmark compares, and the one build cache they share.

A variant is the dense source or a method at a size (`Variant`), or a hand-written plan (`build_plan_variant`).
Every built file sits beside a settings stamp (name.settings.json): `cached_build` rebuilds it only when the
stamp differs, so `bench lfuc`, `bench curve` and `bench matrix` reuse each other's builds under
bench/results/work. `heal_key` is the part of the healing settings a build depends on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import D2MError
from ..ggufout import OutType
from ..heal import HealSettings
from ..options import setting
from ..pipeline import ConvertRequest, run
from ..planner import PlanRequest

log = logging.getLogger("d2m")


def results_setting():
    """The `--results` setting of every bench command."""
    return setting(Path("bench/results"), "Where results go (and, in work/, the builds they reuse).")


@dataclass(frozen=True)
class Variant:
    """One model of a table: the dense source, or a method at a size."""

    method: str          # dense | lfuc | prune | attn-prune | upcycle
    fuse: int = 0
    depth_aware: int | None = None   # planned depth-aware at this context depth (lfuc, prune)

    @property
    def name(self) -> str:
        return "dense" if self.method == "dense" else f"{self.label}-{self.fuse}"

    @property
    def label(self) -> str:
        """The method as `--methods` names it: `lfuc-da` is lfuc planned depth-aware."""
        return self.method + ("-da" if self.depth_aware is not None else "")

    @classmethod
    def of(cls, label: str, fuse: int, depth: int) -> "Variant":
        """The variant a `--methods` entry names; `-da` plans depth-aware at the depth the table times."""
        if label.endswith("-da"):
            if label not in ("lfuc-da", "prune-da"):
                raise D2MError(f"method {label!r}: only lfuc and prune plan depth-aware (lfuc-da, prune-da)")
            return cls(label.removesuffix("-da"), fuse, depth_aware=depth)
        return cls(label, fuse)

    def request(self) -> PlanRequest:
        if self.depth_aware is None:
            return PlanRequest(method=self.method, fuse=self.fuse)
        return PlanRequest(method=self.method, fuse=self.fuse, depth_aware=True, depth=self.depth_aware)


# ---- the cache --------------------------------------------------------------------------------------------

def stamp_of(out: Path) -> Path:
    """The settings stamp beside a built file."""
    return out.with_suffix(".settings.json")


def cached_build(out: Path, settings: str, build: Callable[[], object]) -> Path:
    """`out`, built by `build()` unless it exists with the same settings stamp; the stamp is written only once
    the build has succeeded, so a failed build is redone next time."""
    stamp = stamp_of(out)
    if out.is_file() and stamp.is_file() and stamp.read_text() == settings:
        return out
    build()
    stamp.write_text(settings)
    return out


def source_key(hf_dir: Path) -> str:
    """The source model a build came from, in its stamp: one results folder serves several models."""
    return str(Path(hf_dir).resolve())


def heal_key(heal: HealSettings, guests: bool = True) -> dict:
    """The healing settings a built variant depends on; `guests=False` (a plan without guest experts, such as
    pruning) leaves out the guests' settings, so switching `--freeze-guests/--train-guests` or
    `--min-expert-share` or `--host-first` rebuilds LF-UC only."""
    key = {"minutes": heal.minutes, "tokens": heal.tokens, "block_local_fraction": heal.block_local_fraction,
           "ctx": heal.ctx, "max_chunks": heal.max_chunks, "precision": heal.e2e.precision}
    if guests:
        key["freeze_guests"] = heal.freeze_guests
        key["min_expert_share"] = heal.min_expert_share
        key["host_first"] = heal.host_first
    return key


def budget_work_dir(results: Path, heal: HealSettings) -> Path:
    """Where variants healed with `heal` are built: one folder per token budget, shared by `bench lfuc` and
    `bench curve` (a variant is rebuilt only when its settings stamp differs)."""
    return Path(results) / "work" / f"heal-{heal.tokens or 0}"


# ---- building -----------------------------------------------------------------------------------------------

def build_variant(v: Variant, hf_dir: Path, work: Path, outtype: OutType, heal: HealSettings,
                  scores: Path | None, progress: bool = True) -> Path:
    """The variant's GGUF (reused when already built with the same settings)."""
    out = work / f"{v.name}-{outtype.value}.gguf"
    request = v.request()
    variant = {k: x for k, x in asdict(v).items() if x is not None}
    settings = json.dumps({"source": source_key(hf_dir), "variant": variant, "plan": repr(request),
                           "outtype": outtype.value,
                           "gguf_arch": ConvertRequest.gguf_arch.value,
                           "heal": heal_key(heal, guests=v.method == "lfuc")}, sort_keys=True)

    def build() -> None:
        t = time.monotonic()
        if v.method == "dense":
            from ..dense_export import export_dense
            export_dense(hf_dir, out, outtype, progress=progress)
        else:
            run(ConvertRequest(hf_dir=hf_dir, out=out, outtype=outtype, scores=scores, request=request,
                               healing=heal, work_dir=work / f"{v.name}.d2m", progress=progress))
        log.info("built %s in %.1f min", out.name, (time.monotonic() - t) / 60)

    return cached_build(out, settings, build)


def build_plan_variant(name: str, plan: Path, hf_dir: Path, work: Path, outtype: OutType, heal: HealSettings,
                       progress: bool = True) -> Path:
    """The GGUF of a hand-written plan (examples/plans), named `name` (reused when built with the same settings)."""
    out = work / f"{name}-{outtype.value}.gguf"
    plan_text = Path(plan).read_text(encoding="utf-8")
    settings = json.dumps({"source": source_key(hf_dir), "plan": plan_text, "outtype": outtype.value,
                           "gguf_arch": ConvertRequest.gguf_arch.value, "heal": heal_key(heal)}, sort_keys=True)
    return cached_build(out, settings, lambda: run(ConvertRequest(
        hf_dir=hf_dir, out=out, outtype=outtype, plan=Path(plan), healing=heal, work_dir=work / f"{name}.d2m",
        progress=progress)))


def healing_spent(work_dir: Path) -> dict:
    """Tokens and minutes a variant's healing took (its heal.json; zero when it was not healed)."""
    try:
        stages = json.loads((work_dir / "heal.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {"tokens": 0, "minutes": 0.0}
    return {"tokens": sum(s["tokens"] for s in stages),
            "minutes": round(sum(s.get("seconds", 0.0) for s in stages) / 60, 1)}


__all__ = ["Variant", "stamp_of", "cached_build", "source_key", "heal_key", "budget_work_dir", "build_variant",
           "build_plan_variant", "healing_spent"]
