"""What the command-line entry points share: user errors become one line on stderr and exit code 2.

Library code raises its own exception types (``StudyReadError``, ``DatasetError``,
``ModelLoadError``, ...), each with a one-line message naming the file and the problem. The entry
points wrap their work in :func:`exit_on_user_error`, which prints ``error: <message>`` and exits
with status 2, with no traceback. Anything else is a bug and keeps its traceback.

Settings are checked at the entry point, before any output is touched: :func:`check_config` with a
rule table (:data:`TRAIN_CONFIG_RULES`, ...) turns ``trainer.epochs=abc`` into the one-line
:class:`ConfigError` ``trainer.epochs=abc: expected an integer >= 1``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base for errors caused by the user's input or settings (not by a bug)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "bad input": shown as one line, exit code 2."""
    from radlogics_repro.atomic import UnsafeNameError
    from radlogics_repro.data import DatasetError
    from radlogics_repro.io import StudyReadError
    from radlogics_repro.models import ModelLoadError, PretrainedWeightsError
    from radlogics_repro.synth.phantom import SynthError

    return (UserError, StudyReadError, DatasetError, ModelLoadError, PretrainedWeightsError,
            UnsafeNameError, FileExistsError, SynthError)


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a user error raised inside the block into ``error: <one line>`` and exit code 2."""
    try:
        yield
    except user_error_types() as err:
        message = " ".join(str(err).split())
        log.debug("user error: %s", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
"""The Hydra config folder every entry point reads (``config_path`` of their ``hydra.main``)."""


def check_overrides(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Compose ``config_name`` once with the command-line overrides, before Hydra runs, so that an
    override Hydra cannot parse or apply (``note=a (b)``, ``+experiment=nope``, ``trainer.epochs``
    without ``=``) stops with ``error: bad configuration: <Hydra's first line>`` and exit code 2
    instead of Hydra's multi-line report and exit code 1. Flags (``--help``, ``-m``, ...) are left
    to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg.startswith("-") for arg in argv):
        return
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name, overrides=argv, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        print(f"error: bad configuration: {first}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# ---------------------------------------------------------------------------------------------
# Checking settings at the entry point
# ---------------------------------------------------------------------------------------------
#
# Hydra parses ``key=value`` overrides without a schema: ``trainer.epochs=abc`` arrives as the
# string "abc" and would fail deep inside Keras with a traceback. Each entry point checks its
# settings first with :func:`check_config` and a table of rules (setting -> expected type/range).


class ConfigError(UserError):
    """Settings (YAML or command-line overrides) of the wrong type or out of range."""


Check = Callable[[object], "str | None"]
"""A rule: value -> None when acceptable, else what was expected (``"an integer >= 1"``)."""

_ABSENT = object()


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rule(expected: str, accepts: Callable[[object], bool], optional: bool) -> Check:
    def check(value):
        if value is None and optional:
            return None
        return None if accepts(value) else expected + (" or null" if optional else "")
    return check


def integer(minimum: int | None = None, *, multiple_of: int | None = None,
            optional: bool = False) -> Check:
    """An integer (not a bool), ``>= minimum`` and a multiple of ``multiple_of`` when given."""
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (
        f" and a multiple of {multiple_of}" if multiple_of else "")
    return _rule(expected, lambda v: _is_integer(v) and (minimum is None or v >= minimum)
                 and (not multiple_of or v % multiple_of == 0), optional)


def number(minimum: float | None = None, maximum: float | None = None, *,
           above_minimum: bool = False, optional: bool = False) -> Check:
    """A finite number within ``[minimum, maximum]`` (``(minimum, ...`` when ``above_minimum``)."""
    low = "" if minimum is None else f" {'>' if above_minimum else '>='} {minimum:g}"
    high = "" if maximum is None else f" <= {maximum:g}"
    expected = "a number" + low + (" and" if low and high else "") + high

    def accepts(v):
        if not _is_number(v):
            return False
        if minimum is not None and (v <= minimum if above_minimum else v < minimum):
            return False
        return maximum is None or v <= maximum
    return _rule(expected, accepts, optional)


def boolean() -> Check:
    """``true`` or ``false``."""
    return _rule("true or false", lambda v: isinstance(v, bool), optional=False)


def one_of(*choices: str) -> Check:
    """One of the given strings."""
    return _rule("one of " + ", ".join(choices), lambda v: isinstance(v, str) and v in choices,
                 optional=False)


def text() -> Check:
    """A non-empty string (a path, a name)."""
    return _rule("a non-empty text", lambda v: isinstance(v, str) and bool(v.strip()), optional=False)


def integers(minimum: int | None = None) -> Check:
    """A non-empty list of integers, each ``>= minimum``."""
    expected = "a list of integers" + (f" >= {minimum}" if minimum is not None else "")
    return _rule(expected, lambda v: isinstance(v, list) and bool(v) and all(
        _is_integer(x) and (minimum is None or x >= minimum) for x in v), optional=False)


def interval() -> Check:
    """Two numbers ``[low, high]`` with ``low < high``."""
    return _rule("two numbers [low, high] with low < high", lambda v: isinstance(v, list)
                 and len(v) == 2 and all(_is_number(x) for x in v) and v[0] < v[1], optional=False)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return " ".join(str(value).split())


def check_config(cfg, rules: Mapping[str, Check]) -> None:
    """Check the settings named in ``rules`` (dotted keys; keys absent from ``cfg`` are skipped).

    Raises:
        ConfigError: one line listing every bad setting as ``key=value: expected ...``; a
            mandatory value left unset (``???``) is reported as ``key: missing``.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    problems = []
    for key, check in rules.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:
            message = " ".join(str(err).split("\n")[0].split())
            problems.append(f"{key}: missing; set it with {key}=..." if "Missing mandatory" in message
                            else f"{key}: {message}")
            continue
        if value is _ABSENT:
            continue
        expected = check(value)
        if expected:
            problems.append(f"{key}={_show(value)}: expected {expected}")
    if problems:
        raise ConfigError("; ".join(problems))


_ANALYSIS_RULES: dict[str, Check] = {
    "analysis.slice_threshold": number(0, 1, optional=True),
    "analysis.case_threshold": number(0, 1, optional=True),
    "analysis.map_threshold": number(0, 1),
    "analysis.blur_sigma_mm": number(0),
    "analysis.ggo_hu": interval(),
    "analysis.consolidation_hu": interval(),
    "analysis.engine": one_of("fused", "tf-keras-vis"),
    "analysis.batch_size": integer(1),
    "analysis.n_overlays": integer(0),
    "analysis.precision": one_of("auto", "model", "float32", "mixed_bfloat16", "mixed_float16"),
    "analysis.skip_lung_free_slices": boolean(),
    "analysis.lung_slice_step_mm": number(0, optional=True),
    "analysis.map_within_lung": boolean(),
    "analysis.map_scale": one_of("per_slice", "fixed"),
}

TRAIN_CONFIG_RULES: dict[str, Check] = {
    "seed": integer(0),
    "overwrite": boolean(),
    "trainer.epochs": integer(1),
    "trainer.batch_size": integer(1),
    "trainer.eval_batch_size": integer(1),
    "trainer.learning_rate": number(0, above_minimum=True),
    "trainer.lr_schedule": one_of("constant", "cosine"),
    "trainer.warmup_epochs": integer(0),
    "trainer.batchnorm_momentum": number(0, 1, optional=True),
    "trainer.freeze_batchnorm": boolean(),
    "trainer.weight_decay": number(0),
    "trainer.early_stopping_patience": integer(0),
    "trainer.precision": one_of("auto", "float32", "mixed_bfloat16", "mixed_float16"),
    "trainer.first_stage.input_size": integer(32, multiple_of=16),
    "trainer.first_stage.epochs": integer(1),
    "trainer.first_stage.learning_rate": number(0, above_minimum=True),
    "trainer.first_stage.warmup_epochs": integer(0),
    "trainer.first_stage.early_stopping_patience": integer(0, optional=True),
    "trainer.strategy": one_of("default", "mirrored", "multi_worker"),
    "trainer.deterministic": boolean(),
    "trainer.max_cases_per_split": integer(1, optional=True),
    "trainer.cache_slices": boolean(),
    "trainer.max_val_slices_per_epoch": integer(1, optional=True),
    "data.manifest": text(),
    "data.split_csv": text(),
    "data.input_size": integer(32, multiple_of=16),
    "data.slice_step_mm": number(0),
    "data.input_mode": one_of("lung_crop", "lung_masked", "whole_slice"),
    "data.crop_margin_mm": number(0),
    "data.min_lesion_area_mm2": number(0),
    "data.min_lung_area_mm2": number(0),
    "data.empty_fraction": number(0, 1),
    "model.dropout": number(0, 1),
    "model.dense_units": integers(1),
    "model.decoder_filters": integers(1),
    "model.require_pretrained": boolean(),
    "model.backbone": one_of("resnet50", "vgg16"),
    "model.temperature": number(0, above_minimum=True),
    "model.projection_units": integers(1),
    "data.max_slices_per_source": integer(1, optional=True),
    "augment.noise_probability": number(0, 1),
    "augment.scanner_noise": boolean(),
    "augment.scanner_noise_hu": interval(),
    "augment.scanner_noise_sigma_px": number(0),
    "augment.scanner_noise_probability": number(0, 1),
}
"""Settings of ``python -m radlogics_repro.train`` checked before a run folder is touched."""

ANALYZE_CONFIG_RULES: dict[str, Check] = {**_ANALYSIS_RULES, "output_dir": text(), "overwrite": boolean(),
                                          "merge": boolean()}
"""Settings of ``python -m radlogics_repro.analyze`` (``input`` is checked by the command itself)."""

EVALUATE_CONFIG_RULES: dict[str, Check] = {
    **_ANALYSIS_RULES, "split": one_of("train", "val", "test"), "output_dir": text(),
    "max_cases": integer(1, optional=True), "n_boot": integer(0), "overwrite": boolean(),
    "data.manifest": text(),
}
"""Settings of ``python -m radlogics_repro.evaluate``."""
