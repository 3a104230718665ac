"""The experiment spec: its format, and its check before anything runs.

An experiment is a YAML file in experiments/: named runs (lists of `framework.run` overrides), overrides shared by
every run at each scale, an optional grid per scale (every run in every cell), and how to aggregate
(framework.analysis.experiments runs it):

    title: ...
    kind: table | curve | pareto | tradeoff | overoptimisation | monitor   # the last two: the analyses of
                                                 # framework.analysis.overoptimisation and .monitor_study
    metrics: [reward, adherence, drift_rmse]     # see below
    scales: {testbed: [overrides...], paper: [overrides...]}
    defaults: {testbed: {optimises_noise: [method.opt_steps=30, method.lr=0.03]}}   # optional: per scale, the
                                                 # overrides of every run whose method is of that kind
                                                 # (framework.config.methods.KINDS), unless the run sets the key
    grid: {paper: {model: {SD1.5: [model=sd15], SDXL: [model=sdxl]}, reward: {...}}}   # optional, per scale
    runs: {label: [overrides...], ...}           # "{run:LABEL}" in an override is that run's directory (same cell);
                                                 # {scale: [overrides...]} instead of a list: per-scale overrides,
                                                 # and the run exists only at the scales it names; with
                                                 # `cells: [option, ...]` beside them, at a scale with a grid only
                                                 # in the cells that have one of these options (a λ grid per reward)
    versus: LABEL                                # win_rate: share of items where LABEL's image beats the row's;
                                                 # paired.<metric>: the row's minus LABEL's, item by item
    judges: [adherence, eval_pickscore, reward]  # ... one win-rate column per judge (`win_rate:<judge>`): the
                                                 # optimised reward or any recorded final metric; a judge that no run
                                                 # of the scale recorded is left out
    pareto: {x: sets.final_diversity_vendi, y: reward}   # kind pareto: the scatter to draw
    curves: [reward, drift_rmse, r_mira]         # kind curve: per-step keys to plot (default: the item metrics)
    tradeoff: {y: reward, x: [adherence, drift_rmse]}  # kind tradeoff: y against each x along every run's
                                                 # optimisation trajectory (step means), ending at its final images
                                                 # (means with bootstrap intervals); runs without one: a point
    monitor: {tune: Brightness, report: Proxy}   # kind monitor: the grid options the rule is tuned and reported on

Metrics: per-item final values (`reward` = the optimised reward, `adherence`, `drift_rmse`, `eval_<name>`, ...,
and compute: `evals`, `seconds`; mean and bootstrap interval over items), `last.<key>` (the value at the last
optimisation step, e.g. `last.r_mira`), `held_out.<key>` (the value at the step a noise method's held-out
stopping rule chose: `method.select`, `method.held_out`), `paired.<metric>` (the per-item difference from the
`versus` run's same item, with ±2 paired standard errors), run-level `sets.<key>` of summary.json (CMMD, diversity,
spectral distance; a single value) and `win_rate` (one column per judge; bootstrap interval over prompts). A metric
that no run of the scale recorded (e.g. `sets.cmmd_judge` off the testbed) is left out of the table, with a note.
"""

from pathlib import Path

import yaml

from framework.analysis.tables import table_metrics
from framework.config.methods import KINDS as METHOD_KINDS
from framework.core.errors import FrameworkError, first_line

EXPERIMENTS_DIR = (
    Path(__file__).resolve().parents[1] / "experiment_specs"
)  # package data (<repo>/experiments links here)
KINDS = ("table", "curve", "pareto", "tradeoff", "overoptimisation", "monitor")


REQUIRED_KEYS, OPTIONAL_KEYS = (
    ("title", "kind", "metrics", "scales", "runs"),
    ("defaults", "grid", "versus", "judges", "pareto", "curves", "tradeoff", "monitor"),
)
# The names a table may ask for (kept true by a test against what runs record). Item metrics: the final image's
# values, besides `eval_<reward config>` (held-out rewards); step keys: the per-step records (`last.<key>`, curves).
ITEM_METRICS = (
    "reward",
    "adherence",
    "judge_log_prob",
    "gold",
    "gold_match",
    "gold_quality",
    "gold_clean",
    "gold_residual",
    "drift_rmse",
    "drift_embedding",
    "clipscore",
    "kl",
    "disagreement",
    "evals",
    "seconds",
    "peak_memory_mb",
    "batch_items",
)
SET_METRICS = (
    "cmmd",
    "cmmd_judge",
    "spectral_distance",
    "log_spectral_distance",
    "base_diversity_vendi",
    "final_diversity_vendi",
    "base_diversity_pairwise",
    "final_diversity_pairwise",
)
STEP_KEYS = (
    "step",
    "reward",
    "loss",
    "regulariser",
    "grad_norm",
    "noise_sq",
    "r_mira",
    "best_reward",
    "pair_gap",
    "preference",
    "candidate_reward_max",
    "adherence",
    "judge_log_prob",
    "gold",
    "gold_match",
    "gold_quality",
    "gold_clean",
    "gold_residual",
    "drift_rmse",
    "drift_embedding",
    "clipscore",
    "disagreement",
)


def item_metric(name: str) -> bool:
    from framework.core.options import options

    if name.startswith("eval_"):
        return name.removeprefix("eval_") in options("reward")
    return name in ITEM_METRICS


def metric_known(metric: str) -> bool:
    if metric.startswith("sets."):
        return metric.removeprefix("sets.") in SET_METRICS
    if metric.startswith(("last.", "held_out.")):
        key = metric.partition(".")[2]
        return key in STEP_KEYS or item_metric(key)
    if metric.startswith("paired."):
        return item_metric(metric.removeprefix("paired."))
    return metric == "win_rate" or item_metric(metric)


def load_experiment(path: Path) -> dict:
    """An experiment spec, checked before anything runs: its keys, kind, metric names, judges and the keys each
    kind needs; a problem is one error naming the file and the key."""
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FrameworkError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(spec, dict):
        raise FrameworkError(f"{path}: must be a mapping with keys {', '.join(REQUIRED_KEYS)}")
    if "judge" in spec:
        raise FrameworkError(f"{path}: `judge` is now `judges`, a list (one win-rate column per judge)")
    missing = set(REQUIRED_KEYS) - set(spec)
    if missing:
        raise FrameworkError(f"{path}: missing keys {', '.join(sorted(missing))}")
    unknown = sorted(set(spec) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise FrameworkError(
            f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}"
        )
    if spec["kind"] not in KINDS:
        raise FrameworkError(f"{path}: kind {spec['kind']!r} is not one of {', '.join(KINDS)}")
    for key in ("metrics", "judges", "curves"):
        if key in spec and not (isinstance(spec[key], list) and spec[key]):
            raise FrameworkError(f"{path}: {key} must be a non-empty list")
    for metric in spec["metrics"]:
        if not metric_known(metric):
            raise FrameworkError(
                f"{path}: metrics: unknown metric {metric!r}; item metrics: "
                f"{', '.join(ITEM_METRICS)}, eval_<reward>, last.<step key>, paired.<item metric>, sets.<"
                f"{'|'.join(SET_METRICS)}> or win_rate"
            )
    for judge in spec.get("judges", []):
        if not item_metric(judge):
            raise FrameworkError(
                f"{path}: judges: {judge!r} is not an item metric ({', '.join(ITEM_METRICS)}, eval_<reward>)"
            )
    for key in spec.get("curves", []):
        if key not in STEP_KEYS:
            raise FrameworkError(f"{path}: curves: {key!r} is not a per-step key; choose from: {', '.join(STEP_KEYS)}")
    compared = [m for m in spec["metrics"] if m == "win_rate" or m.startswith("paired.")]
    if compared and spec.get("versus") not in spec["runs"]:
        raise FrameworkError(
            f"{path}: metric {compared[0]} needs `versus:` naming one of the runs "
            f"({', '.join(map(str, spec['runs']))}); got {spec.get('versus')!r}"
        )
    options = {o for grid in (spec.get("grid") or {}).values() for axis in grid.values() for o in axis}  # names
    for label, overrides in spec["runs"].items():
        cells = overrides.get("cells", []) if isinstance(overrides, dict) else []
        if not isinstance(cells, list) or not set(cells) <= options:
            raise FrameworkError(
                f"{path}: run {label!r}: cells must list grid options ({', '.join(sorted(options)) or 'no grid'})"
            )
    defaults = spec.get("defaults") or {}
    for scale, by_kind in defaults.items() if isinstance(defaults, dict) else [(None, None)]:
        if (
            scale not in spec["scales"]
            or not isinstance(by_kind, dict)
            or not set(by_kind) <= set(METHOD_KINDS)
            or not all(isinstance(o, list) and all(isinstance(x, str) for x in o) for o in by_kind.values())
        ):
            raise FrameworkError(
                f"{path}: defaults: give {{<scale>: {{<method kind>: [override, ...]}}}} with scales of `scales` "
                f"({', '.join(spec['scales'])}) and kinds {', '.join(METHOD_KINDS)}"
            )
    if spec["kind"] == "pareto":
        axes = spec.get("pareto")
        if not isinstance(axes, dict) or set(axes) != {"x", "y"}:
            raise FrameworkError(f"{path}: kind pareto needs `pareto: {{x: <metric>, y: <metric>}}`")
        for axis, metric in axes.items():
            if metric not in table_metrics(spec):
                raise FrameworkError(f"{path}: pareto.{axis}: {metric!r} must be one of the metrics")
    if spec["kind"] == "tradeoff":
        axes = spec.get("tradeoff")
        if not isinstance(axes, dict) or set(axes) != {"x", "y"} or not isinstance(axes["x"], list):
            raise FrameworkError(f"{path}: kind tradeoff needs `tradeoff: {{y: <metric>, x: [<metric>, ...]}}`")
        for metric in [axes["y"], *axes["x"]]:
            if metric not in spec["metrics"] or metric not in STEP_KEYS:
                raise FrameworkError(
                    f"{path}: tradeoff: {metric!r} must be one of the metrics and a per-step key "
                    f"({', '.join(STEP_KEYS)})"
                )
    if spec["kind"] == "monitor":
        split = spec.get("monitor")
        if not isinstance(split, dict) or set(split) != {"tune", "report"} or not set(split.values()) <= options:
            raise FrameworkError(
                f"{path}: kind monitor needs `monitor: {{tune: <grid option>, report: <grid option>}}` "
                f"(options: {', '.join(sorted(options)) or 'no grid'})"
            )
    return spec


def kind_defaults(spec: dict, scale: str, kind: str, overrides: list[str]) -> list[str]:
    """The spec's defaults for a run at `scale` whose method is of `kind`, less the keys its `overrides` set."""
    own = {o.lstrip("+~").partition("=")[0] for o in overrides}
    defaults = (spec.get("defaults") or {}).get(scale, {}).get(kind, [])
    return [o for o in defaults if o.lstrip("+~").partition("=")[0] not in own]


def run_overrides(spec: dict, scale: str, cell: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """label -> overrides of the runs that exist at `scale` in the grid cell of these options (a run given per scale
    exists at the scales it names; one with `cells:`, at a scale with a grid, only in the cells that have one of
    those options)."""

    def exists(overrides: list | dict) -> bool:
        if isinstance(overrides, list):
            return True
        return scale in overrides and (
            "cells" not in overrides or not cell or bool(set(overrides["cells"]) & set(cell))
        )

    return {
        label: overrides if isinstance(overrides, list) else overrides[scale]
        for label, overrides in spec["runs"].items()
        if exists(overrides)
    }
