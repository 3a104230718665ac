"""`python -m framework.analysis.experiments [--scale testbed|paper] [--experiment NAME ...]` (`make reproduce-tables`).

Every experiment spec (framework.analysis.specs) is checked, and every run's config composed and its weights checked,
before anything runs, so a bad override or a missing weight fails at once with one message listing them all. Then
runs that are missing or unfinished are run (each run directory resumes: finished items are kept; a run is
identified by its configuration, framework.runner.identity, so experiments share identical runs), and every
experiment is
aggregated into outputs/tables/<scale>/<name>.{csv,md,tex} (run means with bootstrap 95 % intervals over items;
framework.analysis.statistics) and, for `kind: curve`, `pareto` or `tradeoff`, <name>.png with its data as CSV beside it
(framework.analysis.tables).
"""

import argparse
import functools
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from framework.analysis.launch import launch_process, run_missing
from framework.analysis.specs import EXPERIMENTS_DIR, kind_defaults, load_experiment, run_overrides
from framework.analysis.tables import aggregate
from framework.config.methods import METHODS, method_kind
from framework.core.errors import ArgumentParser, Failure, FrameworkError, guarded
from framework.runner.identity import identity_hash

RUN_REF = re.compile(r"\{run:([^}]+)\}")  # {run:LABEL}: an earlier run's directory


GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "λ": "lambda"}


def slug(label: str) -> str:
    """A directory name Hydra's override grammar accepts unquoted (ASCII letters, digits, . _ -)."""
    for letter, name in GREEK.items():
        label = label.replace(letter, name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


@dataclass
class Run:
    label: str  # the run's label in the experiment
    cell: dict[str, str]  # grid axis -> option label ({} without a grid)
    overrides: list[str]  # scale, cell and run overrides, {run:LABEL} references resolved to directories
    ident: str  # framework.runner.identity.identity_hash of the composed configuration
    dir: Path
    cfg: Any = None  # the composed config (DictConfig); None for sweep jobs read back from disk
    needs: list[Path] = field(default_factory=list)  # directories of the runs it reads ({run:LABEL}): run first

    @property
    def name(self) -> str:
        return " · ".join([self.label, *self.cell.values()])


def compose_run(overrides: list[str], where: str):
    """The config `framework.run` would get from these overrides; a bad override is one clear error here."""
    from framework.config import compose

    try:
        cfg = compose(overrides)
    except FrameworkError as e:
        raise FrameworkError(f"{where}: {e}") from None
    return cfg, identity_hash(cfg)


def chosen_kind(overrides: list[str]) -> str | None:
    """The kind of the method that `overrides` choose (the last `method=<name>`; each conf/method/<name>.yaml is
    the schema of that name), without composing; None if they choose none or one this process does not know."""
    chosen = [o.partition("=")[2] for o in overrides if o.startswith("method=")]
    return METHODS[chosen[-1]].kind if chosen and chosen[-1] in METHODS else None


def legacy_hash(cfg) -> str:
    """The directory hash of runs made before framework.runner.identity (it also hashed the batch size and the models'
    runtime options). Directories named by it are renamed once, on the next plan; remove after 2027-06."""
    identity = OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("logger", "trainer", "output_dir")]), resolve=True
    )
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def run_directory(runs_root: Path, name: str, cfg, ident: str) -> Path:
    """The directory of a configuration: an existing one of the same configuration (by hash, or by its legacy hash,
    then renamed to the current one), else a new `<name>-<hash>`."""
    existing = sorted(runs_root.glob(f"*-{ident}"))
    if existing:
        return existing[0]
    directory = runs_root / f"{slug(name)}-{ident}"
    for old in sorted(runs_root.glob(f"*-{legacy_hash(cfg)}")):
        old.rename(directory)  # one-time migration, keeping every finished item
        break
    return directory


def plan(spec: dict, scale: str, runs_root: Path, experiment: str, claimed: dict[str, Path]) -> list[Run]:
    """Every run of the experiment at `scale`: each run label in each grid cell, composed. A run's directory is
    named by its label and configuration hash; a directory of the same configuration that exists, or that an
    experiment planned earlier in this call claimed (`claimed`: hash -> directory), is reused."""
    cells: list[dict] = [{}]
    for axis, options in (spec.get("grid") or {}).get(scale, {}).items():
        cells = [cell | {axis: (option, overrides)} for cell in cells for option, overrides in options.items()]
    runs = []
    for cell in cells:
        done: dict[str, Run] = {}
        cell_options = {axis: option for axis, (option, _) in cell.items()}
        # in order: {run:X} names an earlier run of the cell
        for label, overrides in run_overrides(spec, scale, tuple(cell_options.values())).items():
            where = f"experiment {experiment}, run {label!r}"
            needs = []

            def directory(match):
                if match.group(1) not in done:
                    raise FrameworkError(f"{where}: {match.group(0)} must name an earlier run")
                needs.append(done[match.group(1)].dir)
                return str(needs[-1].resolve())

            shared = [*spec["scales"][scale], *(o for _, extra in cell.values() for o in extra)]
            full = [RUN_REF.sub(directory, o) for o in [*shared, *overrides]]
            kind = chosen_kind(full) or method_kind(compose_run(full, where)[0].method)
            if defaults := kind_defaults(spec, scale, kind, full):
                full = [*full[: len(shared)], *defaults, *full[len(shared) :]]
            cfg, ident = compose_run(full, where)
            if ident not in claimed:
                name = " · ".join([label, *cell_options.values()])
                claimed[ident] = run_directory(runs_root, name, cfg, ident)
            done[label] = Run(label, cell_options, full, ident, claimed[ident], cfg, needs)
        runs += done.values()
    return runs


def prepare(name: str, scale: str, out: Path, experiments_dir: Path, claimed: dict) -> tuple[dict, list[Run]]:
    path = experiments_dir / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in experiments_dir.glob("*.yaml"))
        raise FrameworkError(f"no experiment {name!r}; choose from: {', '.join(options)}")
    spec = load_experiment(path)
    if scale not in spec["scales"]:
        raise FrameworkError(f"experiment {name} has no scale {scale!r}; it has: {', '.join(spec['scales'])}")
    return spec, plan(spec, scale, out / "runs" / scale, name, claimed)


def reproduce_all(
    names: list[str], scale: str, out: Path, experiments_dir: Path = EXPERIMENTS_DIR, launch=launch_process, jobs=1
) -> list[Path]:
    """Check every experiment first (configs compose, weights present), then run what is missing (each run through
    `launch`, `jobs` at a time; see `run_missing`) and aggregate."""
    claimed: dict[str, Path] = {}  # one directory per configuration across all the experiments
    planned = {name: prepare(name, scale, out, experiments_dir, claimed) for name in names}
    from framework.runner.preflight import missing_weights

    missing: dict[tuple[str, str], tuple[set, set]] = {}  # (value, why) -> (config keys, experiments)
    for name, (_, runs) in planned.items():
        for key, spec, why in {need for run in runs for need in missing_weights(run.cfg)}:
            keys, names = missing.setdefault((spec, why), (set(), set()))
            keys.add(key)
            names.add(name)
    if missing:
        lines = [
            f"  - {spec!r} ({'; '.join(sorted(keys))}): {why}; needed by {', '.join(sorted(names))}"
            for (spec, why), (keys, names) in sorted(missing.items())
        ]
        raise FrameworkError(
            f"scale {scale}: {len(missing)} weight(s) or prompt file(s) are missing; nothing was run:\n"
            + "\n".join(lines)
            + "\nProvide them: for a hub id, run `hf download <id>` (a file: "
            "`hf download <owner/repo> "
            "<file>`) on a machine with network access and copy the Hugging Face cache (HF_HOME) here; or put local "
            f"files and directories at the paths shown, or point the keys at them in the `scales: {scale}` overrides "
            "of experiments/<name>.yaml (e.g. model.source=/data/sd15)."
        )
    groups = [(run, f"{name}-{scale}") for name, (_, runs) in planned.items() for run in runs]
    failed = run_missing(groups, launch, jobs)
    written = []
    for name, (spec, runs) in planned.items():
        statuses = {run.name: failed[run.dir] for run in runs if run.dir in failed}
        written += aggregate(name, spec, runs, out / "tables" / scale, statuses)
    if failed:
        raise RunsFailed(
            f"{len(failed)} run(s) did not finish; their rows are marked in the tables, a rerun "
            "resumes them:\n" + "\n".join(f"  - {d}: {e}" for d, e in failed.items()),
            written,
        )
    return written


class RunsFailed(Failure):
    """Some runs did not finish; the tables of what did are `written`."""

    def __init__(self, message: str, written: list[Path]):
        super().__init__(message)
        self.written = written


def reproduce(name: str, scale: str, out: Path, experiments_dir: Path = EXPERIMENTS_DIR, launch=launch_process):
    return reproduce_all([name], scale, out, experiments_dir, launch)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="testbed")
    parser.add_argument("--experiment", nargs="*", help="names in --specs (default: all that have the scale)")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument(
        "--jobs",
        type=int,
        help="runs at a time, the CPU threads shared among them (default: one per CPU core on the testbed, whose "
        "small runs use several threads poorly; one at other scales, whose runs each take the whole GPU)",
    )
    parser.add_argument("--specs", type=Path, default=EXPERIMENTS_DIR, help="the directory of the experiment specs "
                        "(default: the shipped ones, experiments/)")  # fmt: skip
    args = parser.parse_args()
    jobs = args.jobs if args.jobs is not None else ((os.cpu_count() or 1) if args.scale == "testbed" else 1)
    if jobs < 1:
        parser.error(f"--jobs {jobs}: runs at a time must be at least 1")
    launch = functools.partial(launch_process, threads=max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None)

    def show(written: list[Path]) -> None:
        for path in written:
            if path.suffix == ".md":
                print("\n" + path.read_text(), end="")
        print(
            "\n".join(
                ["", f"runs:   {args.out / 'runs' / args.scale}/<run>-<config hash>/", "tables and figures:"]
                + [f"  {path}" for path in written]
            ),
            flush=True,
        )

    def work() -> None:
        probe = args.out / f".write-check.{os.getpid()}"
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as e:
            why = f"cannot create or write it ({e.strerror}); give a writable directory"
            raise FrameworkError(f"--out {args.out}: {why}") from None
        # default: every experiment that has the scale (the over-optimisation one needs the testbed's gold)
        names = args.experiment or experiments_of(args.scale, args.specs)
        try:
            show(reproduce_all(names, args.scale, args.out, args.specs, launch=launch, jobs=jobs))
        except RunsFailed as e:  # the tables of what finished, then the failure
            show(e.written)
            raise

    code, _ = guarded(work, args.out / "error.log")
    sys.exit(code)


def experiments_of(scale: str, specs: Path) -> list[str]:
    """The experiments that have `scale`; none is bad input, naming the scales there are."""
    if not specs.is_dir():
        raise FrameworkError(f"--specs {specs}: not a directory of experiment specs")
    loaded = {path.stem: load_experiment(path) for path in sorted(specs.glob("*.yaml"))}
    names = [name for name, spec in loaded.items() if scale in spec["scales"]]
    if not names:
        scales = sorted({s for spec in loaded.values() for s in spec["scales"]})
        raise FrameworkError(f"--scale {scale}: no experiment in {specs} has it; scales: {', '.join(scales) or 'none'}")
    return names


if __name__ == "__main__":
    main()
