"""``edge-ptycho import-onnx`` and ``edge-ptycho registry {init,list,show,deploy,rollback}``.

The registry folder comes from ``--registry DIR`` or the ``EDGE_PTYCHO_REGISTRY`` variable
(:func:`add_registry_argument`, shared with the other commands that read the registry).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .registry import ModelRegistry, import_onnx
from .registry_checks import RegistryError
from .shipped import init_registry

__all__ = ["REGISTRY_ENV", "add_registry_argument", "add_subcommand"]

#: Environment variable giving the default ``--registry`` folder of the CLI.
REGISTRY_ENV = "EDGE_PTYCHO_REGISTRY"


def add_registry_argument(parser: argparse.ArgumentParser) -> None:
    """``--registry DIR``, defaulting to ``$EDGE_PTYCHO_REGISTRY`` (required when that is unset)."""
    env_root = os.environ.get(REGISTRY_ENV)
    parser.add_argument(
        "--registry",
        type=Path,
        default=Path(env_root) if env_root else None,
        required=not env_root,
        metavar="DIR",
        help=f"model registry folder (default: ${REGISTRY_ENV})",
    )


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``edge-ptycho import-onnx`` and ``edge-ptycho registry ACTION``.

    ``ACTION`` is one of ``init``, ``list``, ``show``, ``deploy``, ``rollback``.

    The registry folder comes from ``--registry DIR`` or the ``EDGE_PTYCHO_REGISTRY`` variable.
    """
    common = argparse.ArgumentParser(add_help=False)
    add_registry_argument(common)

    imp = subparsers.add_parser(
        "import-onnx",
        parents=[common],
        help="register an existing ONNX model as a new version",
        description="Check an ONNX model ((batch, 1, 128, 128) input) and publish it into the "
        "registry as a new version, deployed unless --no-deploy.",
    )
    imp.add_argument("onnx_file", type=Path, metavar="FILE.onnx")
    imp.add_argument("--version", help="version name (default: the next vNNNN)")
    imp.add_argument("--no-deploy", action="store_true", help="publish without deploying")
    imp.add_argument("--torch", type=Path, metavar="FILE.pt", help="matching torch state dict")
    imp.add_argument(
        "--model", default="ptychonn2", help="architecture name (default: %(default)s)"
    )
    imp.add_argument("--validation-ssim", type=float, metavar="SSIM", help="expected SSIM level")
    imp.add_argument("--notes", help="free text stored in the manifest")
    imp.set_defaults(func=_cmd_import_onnx)

    reg = subparsers.add_parser(
        "registry",
        help="list, inspect, deploy or roll back model versions",
        description="Inspect the model registry and change the deployed version.",
    )
    actions = reg.add_subparsers(dest="registry_action", metavar="{init,list,show,deploy,rollback}")
    actions.required = True
    init = actions.add_parser("init", help="create a registry with the model shipped in the package, deployed",
                              description="Create the registry DIR (or fill an empty one) with the trained model "
                              "that ships with the package (docs/models.md), verified and deployed as its first "
                              "version.")
    init.add_argument("dir", nargs="?", type=Path, metavar="DIR",
                      help=f"registry folder (default: --registry or ${REGISTRY_ENV})")
    env_root = os.environ.get(REGISTRY_ENV)
    init.add_argument("--registry", type=Path, default=Path(env_root) if env_root else None, metavar="DIR",
                      help="the same as DIR")
    init.set_defaults(func=_cmd_init)
    lst = actions.add_parser("list", parents=[common], help="list versions (* = deployed)")
    lst.add_argument("--verify", action="store_true", help="also check every file's sha256")
    lst.set_defaults(func=_cmd_list)
    show = actions.add_parser("show", parents=[common], help="print a version's manifest")
    show.add_argument("version", nargs="?", help="version (default: the deployed one)")
    show.set_defaults(func=_cmd_show)
    dep = actions.add_parser("deploy", parents=[common], help="verify and deploy a version")
    dep.add_argument("version")
    dep.set_defaults(func=_cmd_deploy)
    rb = actions.add_parser("rollback", parents=[common], help="deploy an earlier version again")
    rb.add_argument("version", nargs="?", help="version (default: the previously deployed one)")
    rb.set_defaults(func=_cmd_rollback)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def _cmd_import_onnx(args: argparse.Namespace) -> int:
    try:
        mv = import_onnx(
            ModelRegistry(args.registry),
            args.onnx_file,
            version=args.version,
            deploy=not args.no_deploy,
            torch_file=args.torch,
            model=args.model,
            validation_ssim=args.validation_ssim,
            notes=args.notes,
        )
    except RegistryError as exc:
        return _fail(exc)
    state = "deployed" if not args.no_deploy else "not deployed"
    print(f"imported {args.onnx_file} as {mv.version} ({state}) in {args.registry}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    root = args.dir or args.registry
    if root is None:
        return _fail(RegistryError(f"give the registry folder: edge-ptycho registry init DIR (or set ${REGISTRY_ENV})"))
    try:
        mv = init_registry(root)
    except RegistryError as exc:
        return _fail(exc)
    shipped = (mv.manifest.get("extra") or {}).get("shipped") or {}
    print(f"initialised {root} with the shipped model {shipped.get('name', mv.manifest.get('model'))} "
          f"as {mv.version} (verified, deployed)")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        registry = ModelRegistry(args.registry, create=False)
        current = registry.current_version()
        scan = registry.scan(check_files=args.verify)
    except RegistryError as exc:
        return _fail(exc)
    good = sorted((mv for _, mv, _ in scan if mv is not None), key=lambda m: (m.created, m.version))
    print(
        f"  {'VERSION':<12} {'CREATED (UTC)':<19} {'PARENT':<12} {'SSIM':>6} {'SCANS':>5}  MODEL"
    )
    for mv in good:
        mark = "*" if mv.version == current else " "
        ssim = "-" if mv.validation_ssim is None else f"{mv.validation_ssim:.3f}"
        print(
            f"{mark} {mv.version:<12} {mv.created:%Y-%m-%d %H:%M:%S} {mv.parent or '-':<12} "
            f"{ssim:>6} {len(mv.training_data):>5}  {mv.manifest.get('model') or '-'}"
        )
    broken = [(name, err) for name, mv, err in scan if mv is None]
    for name, err in broken:
        print(f"! {name:<12} BROKEN: {err}")
    if current is None:
        print("(nothing deployed)")
    return 1 if broken else 0


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        registry = ModelRegistry(args.registry, create=False)
        version = args.version or registry.current_version()
        if version is None:
            return _fail(RegistryError("nothing is deployed: name a version to show"))
        mv = registry.get(version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"# {mv.path}")
    print(json.dumps(mv.manifest, indent=2))
    try:
        registry.verify(version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"# verified: all {len(mv.manifest['files'])} files match their sha256")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    try:
        mv = ModelRegistry(args.registry, create=False).deploy(args.version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"deployed {mv.version}")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    try:
        mv = ModelRegistry(args.registry, create=False).rollback(args.version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"rolled back to {mv.version}")
    return 0
