"""Screening throughput, end to end: tarball member -> parse -> graph -> model -> CSV row.

Usage::

    python bench/screen_throughput.py                         # every CIF of cifs_r.tar.gz
    python bench/screen_throughput.py --limit 2000 --workers 1,2
    python bench/screen_throughput.py --checkpoint models/ions/Li.pt --ions Li,Na
    python bench/screen_throughput.py --checkpoint models/ions/Mg.pt --ions Mg --chgnet-ion Mg \
        --limit 2000 --rescore-top 200 --rescore-uncertain 100 --workers 2 --no-breakdown

It calls ``serving.screen.run.run_screen`` on the snapshot's ``cifs_r.tar.gz`` itself (members are
read straight from the archive, nothing unpacked), so the figure includes archive reading, CIF
parsing, graph building, inference, the partial-results file and the final CSV/summary.  Target:
>= 300 structures/s on 2 cores.

Shared machines: wall-clock throughput depends on what else runs.  The script therefore also
reports CPU seconds (this process + its workers) and the rate per CPU-second, which does not
depend on contention, and the 1-minute load average before each run; the 2-core figure without
contention is bounded by ``2 x per-CPU-second rate`` when workers scale.  A single-process stage
breakdown (read / parse+graph / inference) shows where the time goes.

Two tiers (``--chgnet-ion``): the checkpoint gets a CHGNet GP head fitted on that ion's training
crystals (``bench/chgnet_artifact.py``, share ``--chgnet-weight``), so its champion serves CHGNet;
the screen then runs twice on one output: tier 1 alone (``--rescore-top 0``), then a resume that
only re-scores (tier 2). Each tier's wall and CPU rates, and the arithmetic for 100,000
structures with the command's defaults, are printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/screen_throughput.py` without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from serving.screen.inputs import iter_contents, list_inputs  # noqa: E402
from serving.screen.predictor import Predictor  # noqa: E402
from serving.screen.prepare import init_worker, prepare  # noqa: E402
from serving.screen.run import Rescore, run_screen  # noqa: E402
from voltage_model.predict import VoltageModel  # noqa: E402

CHECKPOINTS = ("models/ions/Li.pt", "models/Li/model.pt", "/tmp/smoke/li.pt")


def snapshot_dir() -> Path:
    env = os.environ.get("MP_SNAPSHOT_DIR")
    return Path(env) if env else ROOT.parent / "shared/data/mp_electrodes_2020"


def default_checkpoint() -> Path:
    for cand in CHECKPOINTS:
        path = ROOT / cand if not cand.startswith("/") else Path(cand)
        if path.is_file():
            return path
    raise SystemExit(f"no checkpoint found (tried {CHECKPOINTS}); pass --checkpoint")


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def with_members(ckpt: Path, n_members: int, tmp: Path) -> Path:
    """A copy of ``ckpt`` with ``n_members`` backbones (perturbed copies of member 0).

    Stands in for the pipeline's ensemble (``ensemble.n_models``: 3) before it exists; the
    perturbation keeps the backbones distinct so none is deduplicated away.
    """
    import copy

    from voltage_model.artifact import load_checkpoint, save_checkpoint

    src = load_checkpoint(ckpt)
    model, heads = src.backbones()[0]
    members = []
    for k in range(1, n_members):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            for name, param in clone.named_parameters():
                if name.startswith("convs."):
                    param.add_(1e-3 * k * torch.randn_like(param))
        members.append((clone, heads or None))
    return save_checkpoint(
        tmp / "ensemble.pt", model, src.model_config, src.converter_dict, src.normalizer,
        src.extra, heads=heads or None, members=members,
    )  # fmt: skip


def end_to_end(archive: Path, models: dict, ions: list[str], workers: int, args) -> None:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "screen.csv"
        c0, t0 = cpu_seconds(), time.perf_counter()
        summary = run_screen(
            archive, ions, models, out, Path(tmp) / "summary.json",
            batch_size=args.batch_size, resume=False, workers=workers, limit=args.limit,
            progress=False,
        )  # fmt: skip
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    n = summary["n_inputs"]
    print(
        f"end to end, workers={workers}: {n} structures ({summary['n_errors']} errors), "
        f"{wall:6.2f} s wall -> {n / wall:6.1f} structures/s | CPU {cpu:6.2f} s -> "
        f"{n / cpu:6.1f} structures per CPU-second | load avg before {load:.2f}"
    )
    for ion, s in summary["per_ion"].items():
        print(f"    {ion}: {s['n_above']} of {s['n']} above 3.0 V ({100 * s['share_above']:.1f}%)")


def breakdown(archive: Path, models: dict, ions: list[str], args) -> None:
    """Single-process time of each step over the same structures."""
    formats = list_inputs(archive)
    ids = sorted(formats)[: args.limit]
    t0 = time.perf_counter()
    jobs = [(k, formats[k], data) for k, data in iter_contents(archive, ids)]
    t_read = time.perf_counter() - t0
    predictor = Predictor(ions, models)
    init_worker(predictor, 500)
    t0 = time.perf_counter()
    prepared = [prepare(*job) for job in jobs]
    t_prep = time.perf_counter() - t0
    good = [p for p in prepared if hasattr(p, "graphs")]
    t0 = time.perf_counter()
    for start in range(0, len(good), args.batch_size):
        predictor.records(good[start : start + args.batch_size])
    t_inf = time.perf_counter() - t0
    n = len(jobs)
    print(f"breakdown (1 process, {n} structures, ions {ions}):")
    for name, sec in (("archive read", t_read), ("parse + graph", t_prep), ("inference", t_inf)):
        print(f"    {name:14s} {sec:6.2f} s  {n / sec:8.1f} structures/s")


def _timed_screen(archive: Path, models: dict, out: Path, workers: int, rescore: Rescore,
                  args: argparse.Namespace) -> tuple[dict, float, float]:  # fmt: skip
    """(summary, wall s, CPU s) of one ``run_screen`` call on ``out`` (resuming it)."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    summary = run_screen(
        archive, list(models), models, out, out.with_suffix(".json"), batch_size=args.batch_size,
        workers=workers, limit=args.limit, progress=False, rescore=rescore,
    )  # fmt: skip
    return summary, time.perf_counter() - t0, cpu_seconds() - c0


def two_tier(archive: Path, models: dict, workers: int, args: argparse.Namespace) -> None:
    """Tier 1 alone, then tier 2 alone (a resume), with their rates and the 100k arithmetic."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "screen.csv"
        s1, w1, c1 = _timed_screen(archive, models, out, workers, Rescore(0, 0), args)
        rescore = Rescore(args.rescore_top, args.rescore_uncertain)
        s2, w2, c2 = _timed_screen(archive, models, out, workers, rescore, args)
    n1, n2 = s1["tiers"]["tier1"]["structures"], s2["tiers"]["tier2"]["structures"]
    print(f"two tiers, workers={workers}, load avg before {load:.2f}:")
    for name, n, wall, cpu in (("tier 1", n1, w1, c1), ("tier 2", n2, w2, c2)):
        print(
            f"    {name}: {n} structures, {wall:7.2f} s wall -> {n / wall:7.1f} structures/s | "
            f"CPU {cpu:7.2f} s -> {n / cpu:7.1f} per CPU-second ({1000 * cpu / n:.1f} ms each)"
        )
    for ion, s in s2["per_ion"].items():
        failed = s["n_tier2_failed"]
        print(f"    {ion} ({s['backbone']}): {s['n_tier2']} re-scored, {failed} failed")
    defaults = Rescore()
    k = defaults.top + defaults.uncertain
    t1, t2 = 100_000 / (n1 / w1), k / (n2 / w2)
    print(
        f"    100,000 structures, defaults (top {defaults.top} + uncertain "
        f"{defaults.uncertain} <= {k} per CHGNet-serving ion, shared across ions): "
        f"tier 1 {t1 / 60:.1f} min + tier 2 <= {t2 / 60:.1f} min per ion at these wall rates"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archive", type=Path, default=snapshot_dir() / "cifs_r.tar.gz")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--ions", default="Li", help="comma list; every ion uses --checkpoint")
    p.add_argument("--limit", type=int, default=None, help="first N structures (sorted ids)")
    p.add_argument("--workers", default="1,2", help="comma list of pool sizes to time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--members", type=int, default=0, help="time a synthetic N-backbone ensemble")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--chgnet-ion", default=None, help="add this ion's CHGNet head: two tiers")
    p.add_argument("--chgnet-weight", type=float, default=0.5, help="its share (1: alone)")
    p.add_argument("--rescore-top", type=int, default=200)
    p.add_argument("--rescore-uncertain", type=int, default=100)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    ckpt = args.checkpoint or default_checkpoint()
    tmp = tempfile.TemporaryDirectory()
    if args.members > 1:
        ckpt = with_members(ckpt, args.members, Path(tmp.name))
    if args.chgnet_ion:
        from chgnet_artifact import build

        ckpt = build(ckpt, args.chgnet_ion, args.chgnet_weight, Path(tmp.name) / "chgnet.pt")
    ions = [i.strip() for i in args.ions.split(",") if i.strip()]
    model = VoltageModel.from_checkpoint(ckpt)
    models = dict.fromkeys(ions, model)
    n_members = len(model.loaded.backbones())
    print(f"checkpoint {ckpt} ({n_members} backbone(s)); archive {args.archive}; "
          f"{os.cpu_count()} CPUs visible")  # fmt: skip
    if not args.no_breakdown:
        breakdown(args.archive, models, ions, args)
    for workers in (int(w) for w in args.workers.split(",")):
        if args.chgnet_ion:
            two_tier(args.archive, models, workers, args)
        else:
            end_to_end(args.archive, models, ions, workers, args)


if __name__ == "__main__":
    main()
