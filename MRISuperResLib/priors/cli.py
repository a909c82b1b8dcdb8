"""The `models` sub-command: list, import and remove priors in the user store.

    python -m MRISuperResLib models list [--json]
    python -m MRISuperResLib models import PATH [PATH2] [--name NAME] [--allow-unverified]
    python -m MRISuperResLib models remove NAME
    python -m MRISuperResLib models card NAME [NAME ...] | --all [--print]
Exit codes as for every command: 0 ok, 2 user error (bad path, checksum mismatch, unknown name).
"""

import json
import sys


def add_parser(subparsers):
    p = subparsers.add_parser("models", help="List, import or remove priors (nothing is downloaded).")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")
    s = sub.add_parser("list", help="Installed priors, and the published one if it is missing.")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("import", help="Import a prior folder or zip, the published MONAI bundle (folder or zip), "
                                      "or its two weight files.")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--name", default=None, help="Name in the store (default: the card's or 'ukbb-brain-ldm').")
    s.add_argument("--allow-unverified", action="store_true",
                   help="Import published weight files whose md5 differs from the known one.")
    s = sub.add_parser("remove", help="Delete a prior from the user store.")
    s.add_argument("name")
    s = sub.add_parser("card", help="Write each prior's README.md model card from its model.json.")
    s.add_argument("names", nargs="*", metavar="NAME", help="Prior name (see `models list`) or folder.")
    s.add_argument("--all", action="store_true", help="Every installed prior.")
    s.add_argument("--print", action="store_true", help="Print the cards instead of writing them.")
    p.set_defaults(handler=handle, models_parser=p)
    return p


def handle(args, out=None) -> int:
    out = out or sys.stdout
    action = getattr(args, "models_command", None)
    if action == "list":
        from .store import list_models, models_dir

        rows = list_models()
        if args.json:
            out.write(json.dumps({"store": models_dir(), "models": rows}, indent=1) + "\n")
            return 0
        out.write("Model store: %s\n" % models_dir())
        for r in rows:
            out.write("%-24s %-5s %-14s %s\n" % (r["name"], r.get("kind") or "?", r["status"], r.get("title", "")))
            if r["status"] == "not installed":
                out.write("    files: %s\n    %s\n" % ("; ".join(r["files"]), r["install"]))
            elif r["status"] == "broken":
                out.write("    %s\n" % r["error"])
        return 0
    if action == "import":
        from .importer import import_model
        from .store import models_dir

        card = import_model(args.paths, name=args.name, allow_unverified=args.allow_unverified)
        sys.stderr.write("Imported prior '%s' into %s.\n" % (card["name"], models_dir()))
        out.write(card["name"] + "\n")
        return 0
    if action == "remove":
        from .importer import remove_model

        folder = remove_model(args.name)
        sys.stderr.write("Removed %s.\n" % folder)
        return 0
    if action == "card":
        return _card(args, out)
    args.models_parser.print_help(sys.stderr)
    return 2


def _card(args, out) -> int:
    from ..errors import InputError
    from .folder import read_card, write_readme
    from .modelcard import render_model_card
    from .store import find_prior, installed

    if bool(args.names) == bool(args.all):
        raise InputError("Name the priors or give --all (not both).", "e.g. `models card synth-brain-paired`.")
    folders = [item["folder"] for item in installed()] if args.all else [find_prior(n) for n in args.names]
    for folder in folders:
        card = read_card(folder)
        if args.print:
            out.write(render_model_card(card) + "\n")
            continue
        out.write(write_readme(folder, card) + "\n")
    return 0
