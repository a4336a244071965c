"""Checks made before a training run creates anything: every usage problem, found first.

`check_run(config, run)` raises `UsageError` (exit status 2, one line naming the option)
when the run cannot start as given, before its folder, checkpoints or metrics exist:
- `--out`: a folder that is not new, empty or an n2n run (`RunDir.ownership_problem`),
  or a local `--out` that is `--data`, lies inside it (its files would be read as
  training images) or holds it; a run that holds checkpoints without `--resume`;
- `--data`: missing, unreadable, without images, a Parquet table without its image
  column; `--holdout` that leaves no image to train on;
- `--crop-size` that is not a multiple of the architecture's size multiple (its
  pooling levels could not take it), or of twice that with `--target neighbor` (the
  half-size sub-samples go through the network too);
- `--init-from`: a checkpoint that does not load, or holds another architecture (a
  U-Net of a smaller width is widened, see the driver);
- `--resume`: a latest checkpoint that does not load, or was made with other settings.

The training code checks some of these again where it acts (they are cheap), so a
library caller that skips this still gets an error, only a later one.
"""
from __future__ import annotations

from pipeline.errors import UsageError
from pipeline.storage.local_paths import refuse_overlap
from pipeline.storage.locations import is_uri
from pipeline.training.config import TrainConfig


def check_run(config: TrainConfig, run) -> None:
    """Every check above, in the order a user fixes them; `run` is the run's `RunDir`."""
    check_out(config, run)
    images = check_data(config)
    check_crop(config)
    check_holdout(config, images)
    if config.init_from:
        check_init_from(config)
    if config.resume:
        check_resume(config, run)


def check_trials(config: TrainConfig) -> None:
    """What every trial of a sweep shares (`n2n sweep`): the data, the holdout and that
    `--init-from` loads (each trial's own folder is new; its crop is checked per corner of the
    space, and its architecture against `--init-from` when the trial starts).

    Decision: a sweep ranks its trials by validation PSNR, which needs clean images; with
    `--noise none` there are none, and the no-reference noise estimate would rank a model that
    blurs first. So it is refused: sweep on clean images with noise like the photos'."""
    from pipeline.data.noise import NoNoise, parse_noise

    if isinstance(parse_noise(config.noise), NoNoise):
        raise UsageError("--noise none: a sweep ranks trials by validation PSNR, which needs clean images (the "
                         "no-reference noise estimate would favour blur); sweep on clean images with synthetic "
                         "noise like your photos', then train on the noisy ones with the best settings")
    check_holdout(config, check_data(config))
    if config.init_from:
        check_init_from(config, architecture=False)


def check_out(config: TrainConfig, run) -> None:
    if not config.out:
        raise UsageError("--out must name the run's folder")
    if not is_uri(config.data) and not is_uri(config.out):
        refuse_overlap(config.data, config.out, source_label="--data", output_label="--out")
    problem = run.ownership_problem()
    if problem:
        raise UsageError(f"--out {config.out!r} {problem}")
    if not config.resume and run.checkpoints():
        raise UsageError(f"--out {config.out!r} already holds checkpoints: pass --resume to continue, "
                         f"or another --out")


def check_data(config: TrainConfig) -> int:
    """The number of images (or pairs) in `--data`; a UsageError when there are none."""
    from pipeline.data.datasets import is_pairs_table, open_dataset, open_pairs

    try:
        dataset = open_pairs(config.data) if is_pairs_table(config.data) else open_dataset(config.data)
    except FileNotFoundError:
        raise UsageError(f"--data {config.data!r}: no such file or folder") from None
    except (OSError, ValueError) as error:
        text = str(error)
        raise UsageError(text if config.data in text else f"--data {config.data!r}: {text}") from None
    if len(dataset) == 0:
        raise UsageError(f"--data {config.data!r} holds no images: nothing to train on")
    return len(dataset)


def check_crop(config: TrainConfig) -> None:
    from n2n_core.architectures import size_multiple

    multiple = size_multiple(config.arch, **config.arch_args)
    if config.crop_size % multiple:
        raise UsageError(f"--crop-size {config.crop_size} must be a multiple of {multiple}: {config.arch} "
                         f"{_arguments(config)} takes inputs whose sides are multiples of {multiple}")
    if config.target == "neighbor" and config.crop_size % (2 * multiple):
        raise UsageError(f"--crop-size {config.crop_size} must be a multiple of {2 * multiple} with --target "
                         f"neighbor: the network also takes the half-size sub-samples, whose sides must be "
                         f"multiples of {multiple}")


def check_holdout(config: TrainConfig, images: int) -> None:
    if config.holdout >= images:
        raise UsageError(f"--holdout {config.holdout} leaves no image to train on: --data holds {images}")


def check_init_from(config: TrainConfig, *, architecture: bool = True) -> None:
    from n2n_core.architectures import model_config
    from n2n_core.tensorfile import CheckpointError
    from pipeline.training.driver import _widens  # the rule the driver applies when it loads the weights
    from pipeline.training.run_dir import read_checkpoint

    source = config.init_from
    if source == "default":
        from pipeline.assets import default_model_path

        source = str(default_model_path())
    try:
        saved = read_checkpoint(source).model_config
    except CheckpointError as error:
        raise UsageError(f"--init-from {error}") from None
    except OSError as error:
        raise UsageError(f"--init-from {config.init_from!r}: {error.strerror or error}") from None
    if not architecture:
        return
    wanted = model_config(config.arch, **config.arch_args)
    if (saved.name, dict(saved.kwargs)) != (wanted.name, dict(wanted.kwargs)) and not _widens(saved, wanted):
        raise UsageError(f"--init-from {config.init_from}: holds {saved.name} {saved.kwargs}, but this run trains "
                         f"{wanted.name} {wanted.kwargs}; pass the same --arch and --arch-arg (or, for a unet, "
                         f"only a larger width)")


def check_resume(config: TrainConfig, run) -> None:
    from n2n_core.tensorfile import CheckpointError
    from pipeline.training.driver import _RESUME_KEYS, _same_setting  # what the driver compares on resume

    found = run.checkpoints()
    if not found:
        return  # nothing to resume: the run starts at step 0 (the driver says so)
    name = found[-1][1]
    try:
        saved = run.read_checkpoint(name).config or {}
    except CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    changed = [k for k in _RESUME_KEYS if k in saved and not _same_setting(k, saved[k], getattr(config, k))]
    if changed:
        raise UsageError(f"--resume: {run.where(name)}: cannot resume with changed settings "
                         + ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed)
                         + "; pass them as they were, or train into another --out")


def _arguments(config: TrainConfig) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(config.arch_args.items())) or "(default arguments)"
