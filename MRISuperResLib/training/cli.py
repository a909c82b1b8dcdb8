"""`python -m MRISuperResLib train autoencoder|ldm|vdm|paired|export ...`: resumable, chunked training on synthetic brains.

A run folder holds everything (run.json, checkpoint.pt, log.jsonl). Run the same command again with
--resume (only --run-dir is needed then) to continue; each invocation stops at --steps, after
--chunk-steps steps, or after --max-minutes (default 9, so a chunk fits a 10-minute command limit).
Exit code 0 whether the run finished or stopped for a chunk/time limit; the last line (or the
`result` event) says which and how to continue.
"""

import json
import os
import shlex
import sys
import time

from ..errors import InputError
from ..progress import JsonLinesSink

_TRAIN_KEYS = ("steps", "chunk_steps", "max_minutes", "checkpoint_every", "log_every", "lr", "warmup_steps",
               "weight_decay", "grad_clip", "seed", "ema")
_RUNTIME_KEYS = ("steps", "chunk_steps", "max_minutes", "checkpoint_every", "log_every")
# Tasks in their own modules: each offers add_arguments(parser), new_options(args, synth_options) and
# the task class (constructor (options, device)); adding one is one file plus one line here.
_PLUGINS = {"vdm": ("vdm", "VDMTask", "2D variational diffusion prior (k-space method) on synthetic slices."),
            "paired": ("paired", "PairedTask", "Paired conditional diffusion (LR-conditioned) on synthetic patches.")}


def _plugin(task):
    import importlib

    modname, clsname, _ = _PLUGINS[task]
    module = importlib.import_module(__package__ + "." + modname)
    return module, getattr(module, clsname)


def _log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _common(p):
    p.add_argument("--run-dir", required=True, help="Folder of this run (checkpoint, log, settings).")
    p.add_argument("--resume", action="store_true", help="Continue the run in --run-dir from its checkpoint.")
    p.add_argument("--init-from", default=None, metavar="PRIOR",
                   help="Start a new run from an exported prior's network (name or folder): its architecture and "
                        "weights; the optimiser starts afresh. For continuing training when the run folder is gone.")
    p.add_argument("--steps", type=int, default=None, help="Total steps of the run (default 1000).")
    p.add_argument("--chunk-steps", type=int, default=None, help="Stop after this many steps in this invocation.")
    p.add_argument("--max-minutes", type=float, default=None, help="Stop and checkpoint after this long (default 9).")
    p.add_argument("--checkpoint-every", type=int, default=None, help="Checkpoint every N steps (default 100).")
    p.add_argument("--log-every", type=int, default=None, help="Log the loss every N steps (default 1).")
    p.add_argument("--lr", type=float, default=None, help="Learning rate (AdamW; default 1e-4).")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=None, help="Gradient norm clip (default 1; 0 = off).")
    p.add_argument("--seed", type=int, default=None, help="Seed of initial weights and of every step's draws.")
    p.add_argument("--ema", type=float, default=None,
                   help="Keep an exponential moving average of the weights with this decay (e.g. 0.999) and export "
                        "it instead of the last weights (default 0: off; may be turned on at a resume).")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default).")
    p.add_argument("--workers", type=int, default=0,
                   help="Processes that draw the next steps' synthetic batches while this one trains (default 0: "
                        "draw in the training process). On a GPU, give it the free CPU cores: one core cannot feed "
                        "it. The run's weights do not depend on it.")
    p.add_argument("--progress", choices=["text", "jsonl"], default="text")
    p.add_argument("--export", default=None, metavar="DIR", help="When the run reaches --steps, write the prior here.")
    p.add_argument("--name", default=None, help="Prior name for --export (default: the folder's name).")
    p.add_argument("--eval-count", type=int, default=4, help="Held-out brains scored at export.")
    # data
    p.add_argument("--grid", type=int, nargs=3, default=None, help="1 mm grid shape (default 160 224 160).")
    p.add_argument("--downsample", type=int, default=None, help="Train on an f mm grid (shape / f).")
    p.add_argument("--no-head", action="store_true", default=None, help="Skull-stripped brains (no scalp shell).")
    p.add_argument("--stripped-share", type=float, default=None, metavar="F",
                   help="Share of the brains drawn skull-stripped, with no scalp shell (default 0; clinical inputs "
                        "often come stripped).")
    p.add_argument("--folding-share", type=float, default=None, metavar="F",
                   help="Share of the brains drawn with folding of their own, a finer deformation (10 mm) on top of "
                        "the smooth one (default 0; real brains' gyri differ from the average template's).")
    p.add_argument("--contrast", default=None, choices=["t1", "t2", "flair", "pd", "random", "mixed"],
                   help="Tissue contrast of the synthetic brains (default t1; mixed: each brain draws T1, T2, FLAIR, "
                        "PD or a random tissue order, SynthSR-style).")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--pool", type=int, default=None,
                   help="Draw brains from the first N training seeds only (0: a new brain every time).")


def add_parser(subparsers):
    train = subparsers.add_parser("train", help="Train priors on synthetic brains (resumable, in chunks).")
    tsub = train.add_subparsers(dest="train_command", metavar="WHAT")
    tsub.required = True

    a = tsub.add_parser("autoencoder", help="AutoencoderKL (L1 + KL + edge loss) on synthetic brain patches.")
    _common(a)
    a.add_argument("--patch", type=int, nargs=3, default=None, help="Patch size (default 64 64 64; 0 0 0: whole).")
    a.add_argument("--channels", type=int, nargs="+", default=None, help="Channels per level (default 8 16 32 64).")
    a.add_argument("--latent-channels", type=int, default=None)
    a.add_argument("--res-blocks", type=int, default=None)
    a.add_argument("--norm-groups", type=int, default=None)
    a.add_argument("--kl-weight", type=float, default=None)
    a.add_argument("--edge-weight", type=float, default=None)
    a.set_defaults(handler=cmd_train, task="autoencoder")

    m = tsub.add_parser("ldm", help="DiffusionModelUNet on a frozen autoencoder's latents.")
    _common(m)
    m.add_argument("--autoencoder", default=None, help="Autoencoder run folder or exported prior folder.")
    m.add_argument("--channels", type=int, nargs="+", default=None, help="UNet channels (default 32 64 64).")
    m.add_argument("--res-blocks", type=int, default=None)
    m.add_argument("--norm-groups", type=int, default=None)
    m.add_argument("--attention-levels", type=int, nargs="+", default=None,
                   help="1/0 per level: self-attention there (default: all but the first; on CPU keep only the last).")
    m.add_argument("--no-conditioning", action="store_true", default=None)
    m.set_defaults(handler=cmd_train, task="ldm")

    import importlib.util

    for task, (modname, _, help_text) in _PLUGINS.items():
        if importlib.util.find_spec(__package__ + "." + modname) is None:
            continue
        p = tsub.add_parser(task, help=help_text)
        _common(p)
        _plugin(task)[0].add_arguments(p)
        p.set_defaults(handler=cmd_train, task=task)

    e = tsub.add_parser("export", help="Write a run's prior folder (model.json + safetensors).")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--name", default=None)
    e.add_argument("--title", default="")
    e.add_argument("--description", default="")
    e.add_argument("--eval-count", type=int, default=4)
    e.add_argument("--method-defaults", default=None, help="JSON object or file of default method settings.")
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--progress", choices=["text", "jsonl"], default="text")
    e.set_defaults(handler=cmd_export)
    return train


# ---- building tasks ----

def _synth_options(args, base=None):
    s = dict(base or {"shape": [160, 224, 160], "orientation": "LAS", "downsample": 1, "head": True})
    if args.grid is not None:
        s["shape"] = list(args.grid)
    if args.downsample is not None:
        s["downsample"] = args.downsample
    if args.no_head:
        s["head"] = False
    if getattr(args, "contrast", None):
        s["contrast"] = args.contrast
    if getattr(args, "stripped_share", None) is not None:
        s["stripped_share"] = float(args.stripped_share)
    if getattr(args, "folding_share", None) is not None:
        s["folding_share"] = float(args.folding_share)
    return s


def _new_options(args, device):
    """Task options of a new run from the command line; (options, autoencoder module or None)."""
    from .autoencoder import DEFAULT_AE, AutoencoderTask
    from .ldm import LDMTask, autoencoder_provenance, default_unet, load_autoencoder

    if args.task in _PLUGINS:
        return _plugin(args.task)[0].new_options(args, _synth_options(args)), None
    if args.task == "autoencoder":
        net = dict(DEFAULT_AE)
        for key, arg in (("channels", "channels"), ("latent_channels", "latent_channels"),
                         ("num_res_blocks", "res_blocks"), ("norm_num_groups", "norm_groups")):
            if getattr(args, arg) is not None:
                net[key] = getattr(args, arg)
        net["attention_levels"] = [False] * len(net["channels"])
        patch = args.patch if args.patch is not None else (64, 64, 64)
        opts = AutoencoderTask.default_options(
            network=net, synth=_synth_options(args), patch=None if not any(patch) else patch,
            batch_size=args.batch_size or 1, pool=args.pool or 0,
            kl_weight=1e-6 if args.kl_weight is None else args.kl_weight,
            edge_weight=0.5 if args.edge_weight is None else args.edge_weight)
        return opts, None
    if not args.autoencoder:
        raise InputError("train ldm needs --autoencoder for a new run.",
                         "Give the run folder of `train autoencoder` or an exported prior folder.")
    ae, ae_kwargs, synth = load_autoencoder(args.autoencoder, device)
    cond = not args.no_conditioning
    unet = default_unet(ae_kwargs["latent_channels"], cond, tuple(args.channels or (32, 64, 64)))
    if args.res_blocks is not None:
        unet["num_res_blocks"] = args.res_blocks
    if args.norm_groups is not None:
        unet["norm_num_groups"] = args.norm_groups
    if args.attention_levels is not None:
        if len(args.attention_levels) != len(unet["channels"]):
            raise InputError("--attention-levels needs one 0/1 per level (%d levels)." % len(unet["channels"]),
                             "Example: --attention-levels %s" % " ".join(["0"] * (len(unet["channels"]) - 1) + ["1"]))
        unet["attention_levels"] = [bool(v) for v in args.attention_levels]
        unet["num_head_channels"] = [min(32, c) if a else 0 for c, a in zip(unet["channels"], unet["attention_levels"])]
    opts = LDMTask.default_options(ae_kwargs=ae_kwargs, synth=_synth_options(args, synth), network=unet,
                                   batch_size=args.batch_size or 1, pool=256 if args.pool is None else args.pool,
                                   conditioning=cond)
    opts["autoencoder_training"] = autoencoder_provenance(args.autoencoder)
    return opts, ae


def make_task(name, options, device, autoencoder=None):
    from .autoencoder import AutoencoderTask
    from .ldm import LDMTask

    if name == "autoencoder":
        return AutoencoderTask(options, device)
    if name == "ldm":
        return LDMTask(options, device, autoencoder)
    if name in _PLUGINS:
        return _plugin(name)[1](options, device)
    raise InputError("Unknown training task '%s'." % name, "Use autoencoder, ldm, %s." % ", ".join(_PLUGINS))


def _setup(args):
    import torch

    from ..devices import resolve_device

    if args.threads:
        torch.set_num_threads(int(args.threads))
    return resolve_device(args.device)


def _command_line(args):
    """The invocation, rebuilt from the parsed options (main() may have been given argv directly)."""
    parts = ["python", "-m", "MRISuperResLib", "train", args.task]
    skip = {"handler", "task", "command", "train_command"}
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag] + [str(v) for v in value]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _sink(args):
    return JsonLinesSink() if args.progress == "jsonl" else None


def cmd_train(args):
    import torch

    from .trainer import CHECKPOINT, TrainConfig, Trainer, read_run, write_run

    device = _setup(args)
    run_dir = os.path.abspath(args.run_dir)
    ckpt = os.path.join(run_dir, CHECKPOINT)
    ae = None
    if args.resume and args.init_from:
        raise InputError("--init-from starts a new run; %s is resumed from its own checkpoint." % args.run_dir,
                         "Drop --init-from to resume, or give a new --run-dir to start from the prior.")
    if args.resume:
        run = read_run(run_dir)
        if run["task"] != args.task:
            raise InputError("%s is a '%s' run, not '%s'." % (run_dir, run["task"], args.task),
                             "Resume it with `train %s --resume --run-dir %s`." % (run["task"], args.run_dir))
        options = run["options"]
        resume_options = getattr(_plugin(args.task)[0], "resume_options", None) if args.task in _PLUGINS else None
        if resume_options is not None:
            changed = resume_options(args, options)
            for key in sorted(k for k in changed if changed[k] != options.get(k)):
                _log("note: %s changed on resume (%s -> %s)" % (key, options.get(key), changed[key]))
            options = changed
        train = dict(run["train"])
        for key in _TRAIN_KEYS:
            if getattr(args, key) is not None:
                if key not in _RUNTIME_KEYS and getattr(args, key) != train.get(key):
                    _log("note: --%s changed on resume (%s -> %s)" % (key.replace("_", "-"), train.get(key), getattr(args, key)))
                train[key] = getattr(args, key)
        config = TrainConfig(**train)
        commands = run.get("commands", [run.get("command", "")]) + [_command_line(args)]
    else:
        if os.path.exists(ckpt):
            raise InputError("%s already holds a run." % run_dir,
                             "Add --resume to continue it, or choose another --run-dir.")
        train = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k) is not None}
        config = TrainConfig(**train)
        torch.manual_seed(config.seed)
        options, ae = _new_options(args, device)
        if args.init_from:
            from .warmstart import options_from_prior

            options = options_from_prior(args.task, options, args.init_from)
        commands = [_command_line(args)]
    torch.manual_seed(config.seed)  # initial weights depend only on the seed
    task = make_task(args.task, options, device, ae)
    if not args.resume and options.get("init_from"):  # before the Trainer, whose weight average starts from them
        from .warmstart import load_into

        load_into(task, options)
        _log("starting from prior '%s' (%s steps)" % (options["init_from"]["prior"], options["init_from"]["steps"]))
    trainer = Trainer(task, config, run_dir, device, report=_reporter(args), workers=args.workers)  # checks first
    os.makedirs(run_dir, exist_ok=True)
    write_run(run_dir, args.task, options, config)
    _record_commands(run_dir, commands)
    if args.resume:
        if not trainer.restore():
            raise InputError("%s has no checkpoint to resume from." % run_dir,
                             "Start the run again without --resume (after removing the folder).")
    else:
        trainer.save()  # a run can be resumed from its very first moment
    _log("train %s: step %d -> %d on %s (%s)" % (args.task, trainer.step, config.steps, device, run_dir))
    result = trainer.train()
    event = {"event": "result", "task": args.task, "run_dir": run_dir, "step": result.step, "target": result.target,
             "finished": result.finished, "reason": result.reason, "seconds": round(result.seconds, 2),
             "loss": result.last_loss}
    if result.finished and args.export:
        card = export_run(task, run_dir, args.export, args.name, eval_count=args.eval_count)
        event["export"] = os.path.abspath(args.export)
        event["held_out_metrics"] = card["training"]["held_out_metrics"]
    if not result.finished:
        event["resume"] = "python -m MRISuperResLib train %s --resume --run-dir %s" % (args.task, shlex.quote(args.run_dir))
    if args.progress == "jsonl":
        JsonLinesSink()(event)
    _log("stopped at step %d of %d (%s, %.1f s)%s" % (result.step, result.target, result.reason, result.seconds,
                                                      "" if result.finished else "; continue with: " + event["resume"]))
    return 0


def _record_commands(run_dir, commands):
    from ..volume import atomic_write_text
    from .trainer import RUN_FILE

    path = os.path.join(run_dir, RUN_FILE)
    with open(path) as f:
        run = json.load(f)
    run["commands"] = commands
    atomic_write_text(path, json.dumps(run, indent=1))


def _reporter(args):
    sink = _sink(args)
    state = {"last": 0.0}

    def report(info):
        step, total = info["step"], info["total"]
        done = step - info["start"]
        rate = info["elapsed"] / max(done, 1)
        eta = rate * (total - step)
        if sink is not None:
            sink({"event": "progress", "fraction": round(step / max(total, 1), 6), "step": step, "total": total,
                  "message": "training step %d of %d" % (step, total), "eta_s": round(eta, 1),
                  "loss": info["loss"]})
            return
        now = time.monotonic()
        if now - state["last"] >= 10.0 or step == total or done == 1:
            state["last"] = now
            width = 30
            fill = int(width * step / max(total, 1))
            _log("[%s%s] %d/%d loss %.5f  %.2f s/step  eta %.0f min" % ("#" * fill, "." * (width - fill), step, total,
                                                                       info["loss"], rate, eta / 60.0))
    return report


def export_run(task, run_dir, out, name=None, eval_count=4, title="", description="", method_defaults=None):
    from .export import export_prior
    from .synth import split_seeds
    from .trainer import command_line_of, count_parameters, exported_weights, load_checkpoint, read_run

    run = read_run(run_dir)
    ckpt = load_checkpoint(run_dir, "cpu")
    steps = int(ckpt["step"]) if ckpt else 0
    if ckpt:
        weights = exported_weights(ckpt)
        for key, module in task.modules().items():
            module.load_state_dict(weights[key])
    _log("scoring %d held-out brains..." % eval_count)
    metrics = task.evaluate(split_seeds("heldout", eval_count)) if eval_count else {}
    training = {
        "data": "Synthetic brains (%s contrast) from nilearn's MNI152 2009a template (MRISuperResLib.training.synth), "
                % (run["options"].get("synth") or {}).get("contrast", "T1-like") +
                "training seeds < 1000000; " + ("held-out metrics on seeds 1000000..%d" % (1_000_000 + eval_count - 1)
                                                if eval_count else "no held-out metrics (--eval-count 0)"),
        "command": command_line_of(run),
        "steps": steps, "held_out_metrics": metrics, "synth": run["options"].get("synth"),
        "options": {k: v for k, v in run["options"].items()
                    if k not in ("network", "autoencoder", "autoencoder_training", "init_from")},
        "train": run["train"],
        "parameters": {role: count_parameters(m) for role, (_, m, _) in task.networks().items()},
        "weights": ("exponential moving average of the weights (decay %g)" % ckpt["average"]["decay"]
                    if ckpt and "average" in ckpt else "the last step's weights"),
    }
    if run["options"].get("init_from"):
        from .warmstart import init_from_record

        training["init_from"] = init_from_record(run["options"])
    if run["options"].get("autoencoder_training"):
        training["autoencoder"] = run["options"]["autoencoder_training"]
    from ..priors.card import sanitise_name

    out = os.path.abspath(out)
    name = sanitise_name(name or os.path.basename(out.rstrip("/")))  # the prior store's naming rule
    card = export_prior(task, out, name, title=title, description=description,
                        training=training, method_defaults=method_defaults)
    _log("exported %s" % out)
    return card


def cmd_export(args):
    from .trainer import load_checkpoint, read_run

    device = _setup(args)
    run_dir = os.path.abspath(args.run_dir)
    run = read_run(run_dir)
    ckpt = load_checkpoint(run_dir, device)
    if ckpt is None:
        raise InputError("%s has no checkpoint to export." % run_dir, "Train first.")
    task = make_task(run["task"], run["options"], device)
    task.load_state(ckpt.get("task_state") or {})  # export_run loads the weights it writes
    defaults = None
    if args.method_defaults:
        text = args.method_defaults
        if os.path.exists(text):
            with open(text) as f:
                text = f.read()
        try:
            defaults = json.loads(text)
        except ValueError:
            raise InputError("--method-defaults is not JSON.",
                             'Example: \'{"inversesr-decoder": {"cpu": {"iterations": 30}}}\'') from None
    card = export_run(task, run_dir, args.out, args.name, args.eval_count, args.title, args.description, defaults)
    if args.progress == "jsonl":
        JsonLinesSink()({"event": "result", "output": os.path.abspath(args.out), "held_out_metrics":
                         card["training"]["held_out_metrics"]})
    return 0
