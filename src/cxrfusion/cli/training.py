"""`cxrfusion models`, `train` and `reproduce`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cxrfusion.errors import CxrError


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the models with their parameter counts",
        description="List the registered models with total parameters and the parameters trained in "
        "phase 1 (backbone frozen) and phase 2 (all layers). Any timm backbone name also works.",
    )
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> None:
    from cxrfusion.models import count_parameters, create_model, list_models

    print(f"{'model':<18}{'total':>14}{'phase 1':>14}{'phase 2':>14}")
    for name in list_models():
        counts = count_parameters(create_model(name, weights="none"))
        print(
            f"{name:<18}{counts['total']:>14,}{counts['phase1_trainable']:>14,}{counts['phase2_trainable']:>14,}"
        )


TRAIN_HELP = {
    "prepared": "folder written by `cxrfusion prepare` (default runs/prepared)",
    "out": "run directory (default runs/<model>)",
    "model": "simple_cnn, densenet121, efficientnet_b0, fusion or any timm name (see `models`)",
    "weights": "imagenet (download; default), none, a local file for air-gapped sites, or "
    "torchxrayvision:densenet121-res224-all (-nih, -pc, -chex, -rsna, -mimic_nb, -mimic_ch): "
    "chest-X-ray weights for densenet121 (fusion's DenseNet; needs the [txrv] extra), "
    "torchxrayvision:FILE for a local state dict of theirs",
    "loss": "focal (default), bce or asl",
    "focal_alpha": "focal weight of positives: 0.25 weights positives at 0.25, negatives at 0.75",
    "focal_gamma": "focal exponent (default 2)",
    "epochs": "maximum epochs over both phases (default 25)",
    "phase1_epochs": "epochs with the backbone frozen at --lr (default 5)",
    "lr": "phase-1 learning rate, Adam (default 1e-3)",
    "phase2_lr": "learning rate of all layers in phase 2 (default 1e-5)",
    "min_lr": "floor of reduce-on-plateau (default 1e-5)",
    "plateau_patience": "epochs without a better val AUC before the rate drops (default 2)",
    "plateau_factor": "rate multiplier on plateau (default 0.1)",
    "early_stop_patience": "epochs without a better val macro AUC before stopping (default 5)",
    "batch_size": "images per batch (default 32)",
    "cache_size": "side of the cached images to read (default 256)",
    "input_size": "side of the model input (default 224)",
    "workers": "data loader processes (default 4)",
    "seed": "seed of everything random (default 0)",
    "accelerator": "auto, cpu, gpu ... (passed to Lightning)",
    "devices": "auto, a count, or a list such as 0,1 (Lightning)",
    "num_nodes": "nodes for multi-node DDP (torchrun/SLURM)",
    "strategy": "auto, ddp, ... (Lightning)",
    "precision": "auto (bf16/fp16 AMP on GPU, fp32 on CPU), 32-true, 16-mixed, bf16-mixed",
    "channels_last": "NHWC memory layout of model and input (faster convolutions; default true)",
    "compile": "torch.compile the model: a few minutes of compilation, then faster GPU steps "
    "(default false; recorded in config.yaml, a run resumes with or without it)",
    "cache_on_device": "auto (default), on or off: hold the image cache on the GPU and augment "
    "batches there instead of in loader workers; auto when it takes at most a quarter of the "
    "GPU's free memory",
    "deterministic": "repeatable kernels instead of cuDNN's autotuned fastest ones (default false)",
    "limit_train_batches": "fraction or number of training batches per epoch (quick runs)",
    "logger": "csv (default) or tensorboard: Lightning's step log in <out>/logs/ "
    "(`tensorboard --logdir <out>/logs`); metrics.csv is written either way",
}
AUGMENTATION_HELP = {
    "flip": "probability of a horizontal flip (default 0.5)",
    "rotate_deg": "random rotation range in degrees (default 10)",
    "zoom": "random zoom range, relative (default 0.1)",
    "brightness": "random brightness range, relative (default 0.1)",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_train(sub: argparse._SubParsersAction) -> None:
    from cxrfusion.training.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model (two phases, checkpoints, curves)",
        description="Train one model with PyTorch Lightning: phase 1 trains the head on a frozen "
        "backbone, phase 2 fine-tunes all layers; checkpoints and early stopping follow the "
        "validation macro ROC-AUC. Defaults are the report's Table 1. Precedence: defaults < "
        "--config YAML < flags. The run directory holds config.yaml, split.csv, metrics.csv, "
        "loss_curves.png, best.ckpt and last.ckpt.",
        epilog="examples:\n"
        "  cxrfusion train --prepared runs/prepared --model fusion --out runs/fusion\n"
        "  torchrun --standalone --nproc-per-node 4 -m cxrfusion.cli train --prepared "
        "runs/prepared \\\n      --model fusion --accelerator gpu --devices 4 --strategy ddp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument(
        "--data",
        type=Path,
        help="NIH folder: run `prepare` into --prepared first (rank 0 only; other ranks wait)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.ckpt, with its own config.yaml",
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name == "augmentation":
            for key, text in AUGMENTATION_HELP.items():
                p.add_argument(f"--{key.replace('_', '-')}", type=float, default=None, help=text)
            continue
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        switch = dict(nargs="?", const=True) if kind is _bool else {}  # `--compile` alone: true
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=None,
            help=TRAIN_HELP[f.name],
            **switch,
        )
    p.set_defaults(func=_train, check=_check_train)


def train_config(args: argparse.Namespace) -> object:
    """The run's config: defaults < --config YAML < explicit flags.

    With --resume the base is the run's own config.yaml (in --out, default runs/<model>): flags
    may change how it goes on (e.g. --epochs, --devices), not which model it trains.
    """
    from cxrfusion.training.config import TrainConfig

    if args.resume:
        if args.config:
            raise CxrError("--config with --resume: a resumed run reads its own config.yaml")
        run_dir = Path(args.out or f"runs/{args.model or TrainConfig().model}")
        source = run_dir / "config.yaml"
        if not source.is_file():
            raise CxrError(f"{source}: no run to resume (no config.yaml); train without --resume")
        config = TrainConfig.from_yaml(source)
        if args.model is not None and args.model != config.model:
            raise CxrError(f"--model {args.model}: the run in {run_dir} trains {config.model}")
        args.out = str(run_dir)  # the directory it is in now, wherever it was started
    else:
        config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "augmentation" and getattr(args, f.name) is not None
    }
    config = dataclasses.replace(config, **flags)
    augmentation = {k: getattr(args, k) for k in AUGMENTATION_HELP if getattr(args, k) is not None}
    config.augmentation = {**config.augmentation, **augmentation}
    if args.out is None and not args.config:
        config.out = f"runs/{config.model}"
    return config


def _check_train(args: argparse.Namespace) -> None:
    """The config and the folders it names, checked before Lightning loads: mistakes show at once."""
    from cxrfusion.training.config import check_can_run

    config = train_config(args)
    prepared, out = Path(config.prepared), Path(config.out)
    if args.resume and not (out / "last.ckpt").is_file():
        raise CxrError(f"{out}: no last.ckpt to resume; train without --resume first")
    if not args.data and not (prepared / "split.csv").is_file():
        raise CxrError(
            f"{prepared}: no split.csv; run `cxrfusion prepare --out {prepared}` or pass --data"
        )
    from cxrfusion.data.chestmnist import is_chestmnist

    if args.data and not (Path(args.data).is_dir() or is_chestmnist(args.data)):
        raise CxrError(f"{args.data}: not a data folder, chestmnist[:SIZE] or a .npz file (--data)")
    check_can_run(config)


def _train(args: argparse.Namespace) -> None:
    from cxrfusion.training.fit import best_epoch, train
    from cxrfusion.training.launch import launch_rank, prepare_once

    config = train_config(args)
    if args.data:
        from cxrfusion.data.options import PrepareOptions

        options = PrepareOptions(size=config.cache_size, workers=max(config.workers, 1))
        prepare_once(args.data, Path(config.prepared), options)  # rank 0 only; others wait
    run_dir = train(config, resume=args.resume)
    if launch_rank() == 0:
        epoch, auc = best_epoch(run_dir)
        print(f"best validation macro AUC {auc:.3f} (epoch {epoch}); run directory: {run_dir}")


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    from cxrfusion.reproduce import REPORT_MODELS, ReproduceOptions

    d = ReproduceOptions()
    p = sub.add_parser(
        "reproduce",
        help="the report's whole protocol on a GPU machine: prepare, train 4, evaluate, compare",
        description="Run the report's protocol end to end: prepare (half the patients, iterative "
        "70/10/20 split by patient, cache 256), train simple_cnn, densenet121, efficientnet_b0 "
        "and fusion with Table 1 (ImageNet weights, 224 px), evaluate each on the test split "
        "(MC dropout T=25, patient-bootstrap CIs), compare (Table 2, DeLong) and write "
        "summary.md. Resumable: finished steps are skipped, an interrupted training resumes "
        "from its last.ckpt. Trains on one GPU; for several, run the printed train commands "
        "under torchrun and rerun reproduce, which skips them. The options below shrink the run "
        "for a quick check.",
        epilog="example: cxrfusion reproduce --data NIH_DIR --out runs/reproduce --dry-run",
    )
    p.add_argument("--data", type=Path, required=True, help="NIH folder (see `prepare`)")
    p.add_argument(
        "--out", type=Path, default=Path("runs/reproduce"), help="output folder (runs/reproduce)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan of commands; run nothing")
    p.add_argument(
        "--allow-cpu", action="store_true", help="run without a CUDA GPU (small settings only)"
    )
    p.add_argument(
        "--split", choices=("iterative", "official"), default=d.split, help="see `prepare`"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(d.models),
        help=f"models to train and compare (default: {' '.join(REPORT_MODELS)})",
    )
    for name, kind, text in (
        ("patient_fraction", float, "share of patients kept"),
        ("cache_size", int, "side of the cached images"),
        ("input_size", int, "side of the model input"),
        ("epochs", int, "maximum training epochs"),
        ("batch_size", int, "training batch size"),
        ("weights", str, "backbone weights (see `train --help`)"),
        ("mc_samples", int, "MC-dropout passes T"),
        ("bootstrap", int, "patient-bootstrap resamples for the CIs"),
        ("workers", int, "decoding and loader processes"),
        ("seed", int, "seed of split, training and evaluation"),
    ):
        default = getattr(d, name)
        p.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{text} ({default})"
        )
    p.set_defaults(func=_reproduce)


def _reproduce(args: argparse.Namespace) -> None:
    from cxrfusion import reproduce

    options = reproduce.ReproduceOptions(
        split=args.split,
        models=tuple(args.models),
        patient_fraction=args.patient_fraction,
        cache_size=args.cache_size,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        weights=args.weights,
        mc_samples=args.mc_samples,
        bootstrap=args.bootstrap,
        workers=args.workers,
        seed=args.seed,
    )
    if not args.dry_run:
        reproduce.require_gpu(args.allow_cpu)
    reproduce.check_settings(args.data, args.out, options, write=False)
    steps = reproduce.plan(args.data, args.out, options)
    for line in reproduce.wall_time_lines(args.data, steps, reproduce.gpu_name()):
        print(f"# {line}")
    if args.dry_run:
        print("\n".join(reproduce.plan_lines(steps, args.out)))
        return
    files = reproduce.run(args.data, args.out, options, echo=lambda line: print(line, flush=True))
    print("results: " + ", ".join(str(f) for f in files))
