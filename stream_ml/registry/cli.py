"""`stream-ml models list | show | promote | rollback`: the registry from the command line.

Promotion checks the version's feature set against the one this installation serves
(``--feature-set``), so a model cannot go live on inputs it was not trained on by accident.
"""

from __future__ import annotations

import argparse
import json

from stream_ml.config import Settings, add_arguments
from stream_ml.features import feature_set
from stream_ml.registry.store import STAGES, ModelVersion, Registry

KEY_METRICS = ("roc_auc", "pr_auc")


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "models",
        help="the model registry: versions and stage pointers",
        description="List, inspect, promote and roll back model versions. The registry is a folder "
        "(--registry, default `registry` in the state dir); a running scorer follows its stage "
        "pointers within about a second.",
    )
    sub = cmd.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    listing = sub.add_parser("list", help="every version, oldest first, with its stages")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add_arguments(listing)
    listing.set_defaults(run=_list)

    show = sub.add_parser("show", help="a version's metadata (model.json)")
    show.add_argument("version", help="a version id, as `models list` shows it")
    add_arguments(show)
    show.set_defaults(run=_show)

    promote = sub.add_parser(
        "promote",
        help="point a stage at a version",
        description="Point STAGE at VERSION, atomically, after checking the version's files and that "
        "it was trained on the feature set served. The previous version is kept for rollback.",
    )
    promote.add_argument("version", help="a version id, as `models list` shows it")
    promote.add_argument("--stage", required=True, choices=STAGES, help="the stage to move")
    promote.add_argument(
        "--allow-feature-set-mismatch",
        action="store_true",
        help="promote even though the model was trained on another feature set",
    )
    add_arguments(promote)
    promote.set_defaults(run=_promote)

    rollback = sub.add_parser(
        "rollback",
        help="point a stage back at its previous version",
        description="Move STAGE back to the version it pointed to before the last promotion.",
    )
    rollback.add_argument("--stage", required=True, choices=STAGES, help="the stage to move back")
    add_arguments(rollback)
    rollback.set_defaults(run=_rollback)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry(settings.registry_path())
    versions = registry.versions()
    stages = registry.stages()
    at: dict[str, list[str]] = {}
    for stage, version in stages.items():
        if version is not None:
            at.setdefault(version, []).append(stage)
    if args.json:
        print(json.dumps([_summary(mv, at.get(mv.version, [])) for mv in versions], indent=2))
        return 0
    if not versions:
        print(f"no model versions in {registry.root} (the scorer serves its built-in default model)")
        return 0
    header = ["VERSION", "CREATED", "FEATURE SET", *(m.upper() for m in KEY_METRICS), "STAGES"]
    rows = [
        [
            mv.version,
            mv.meta.get("created_at", "?"),
            mv.meta.get("feature_set", "?"),
            *(_metric(mv.meta.get("metrics", {}).get(m)) for m in KEY_METRICS),
            ",".join(at.get(mv.version, [])) or "-",
        ]
        for mv in versions
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _summary(mv: ModelVersion, stages: list[str]) -> dict:
    return {
        "version": mv.version,
        "created_at": mv.meta.get("created_at"),
        "feature_set": mv.meta.get("feature_set"),
        "metrics": mv.meta.get("metrics", {}),
        "stages": stages,
    }


def _metric(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _show(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(Registry(settings.registry_path()).get(args.version).meta, indent=2))
    return 0


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry(settings.registry_path())
    before = registry.stage(args.stage)
    registry.promote(
        args.version,
        args.stage,
        serving_feature_set=feature_set(settings.feature_set).version,
        allow_feature_set_mismatch=args.allow_feature_set_mismatch,
    )
    if before == args.version:
        print(f"{args.stage} already points to {args.version}")
    else:
        print(f"{args.stage}: {before or '(unset)'} -> {args.version}")
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    registry = Registry(settings.registry_path())
    before = registry.stage(args.stage)
    after = registry.rollback(args.stage)
    print(f"{args.stage}: {before} -> {after} (rolled back)")
    return 0
