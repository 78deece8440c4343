"""Any timm model as a ``transformers.TimmWrapperForImageClassification``, keeping timm's init.

Building the wrapper straight from a ``TimmWrapperConfig`` runs transformers' ``_init_weights``
over the whole timm model: normal(0.02) for every conv/linear and gamma 1 for every norm. That
silently replaces timm's initialisation (kaiming convs, zero-init last BN, trunc-normal ViT
weights, ...) and changes what "training from scratch" means. ``create_model`` therefore builds
the timm model with ``timm.create_model`` and puts it into a wrapper shell created on the meta
device, where transformers skips initialisation (exactly as ``from_pretrained`` does).

The config carries everything needed to rebuild and preprocess offline: ``architecture``,
``model_args`` (the timm kwargs), ``id2label``/``label2id`` and timm's ``pretrained_cfg`` (input
size, mean/std, crop_pct, interpolation, ...). ``model.save_pretrained(dir)`` alone is enough for
``AutoModelForImageClassification``, ``AutoImageProcessor`` and ``pipeline(...)`` to load ``dir``
(``TimmWrapperImageProcessor`` reads ``config.json``; its own ``save_pretrained`` writes nothing).
A saved CIFAR model carries its own code (``modeling_esam_cifar.py`` and the backbone files,
named in ``config.json``'s ``auto_map``): it loads anywhere with ``trust_remote_code=True``, or
without it after ``import esam_hf.models``.
"""

import contextlib
import difflib
import json
from typing import Any, Dict, Sequence

import timm
import torch
from timm.models import filter_pretrained_cfg
from transformers import (
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    TimmWrapperImageProcessor,
)

from . import cifar_pyramidnet, cifar_resnet, cifar_wrn  # noqa: F401  (registers the CIFAR models)

__all__ = ["CIFAR_MODELS", "create_image_processor", "create_model"]

CIFAR_MODELS = ("cifar_resnet18", "cifar_wrn28_10", "cifar_pyramidnet110")

# timm.create_model kwargs that only say where weights come from at creation time. They must not
# be replayed by transformers when it rebuilds the architecture from config.json.
_CREATION_ONLY_KWARGS = ("checkpoint_path", "cache_dir")


def create_model(
    model_name: str,
    class_names: Sequence[str],
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> TimmWrapperForImageClassification:
    """Create ``model_name`` (any timm name, or one of ``CIFAR_MODELS``) as an HF image classifier.

    Args:
        model_name: timm model name, optionally with a pretrained tag (``"resnet18.a1_in1k"``).
        class_names: label names; their order defines the class ids (``id2label``/``label2id``).
        pretrained: load timm's pretrained weights (needs the Hub; the classifier is re-created
            for ``len(class_names)`` classes). The CIFAR models have none and raise.
        **timm_kwargs: passed to ``timm.create_model`` (``drop_rate``, ``in_chans``,
            ``pretrained_cfg_overlay``, ...) and stored as ``config.model_args`` so reloading
            rebuilds the same architecture; they must be JSON-serialisable.

    Returns:
        A ``TimmWrapperForImageClassification`` (train mode) whose ``timm_model`` has exactly the
        weights ``timm.create_model`` produced.
    """
    class_names = _check_class_names(class_names)
    _check_model_name(model_name)
    if "num_classes" in timm_kwargs:
        raise TypeError("num_classes is set from class_names; do not pass it to create_model")
    model_args = {k: v for k, v in timm_kwargs.items() if k not in _CREATION_ONLY_KWARGS and v is not None}
    _check_serialisable(model_args)

    # Built first, so a seed set just before create_model() gives timm.create_model's weights.
    timm_model = timm.create_model(model_name, pretrained=pretrained, num_classes=len(class_names), **timm_kwargs)
    config = TimmWrapperConfig(
        architecture=model_name,
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        pretrained_cfg=_export_pretrained_cfg(timm_model, len(class_names)),
        model_args=model_args or None,
    )
    model = _empty_wrapper(config)
    model.timm_model = timm_model
    return model


def create_image_processor(model: Any) -> TimmWrapperImageProcessor:
    """The eval preprocessing of ``model`` (a wrapper model or its config): the same
    ``TimmWrapperImageProcessor`` that ``AutoImageProcessor.from_pretrained`` builds from the
    saved folder. Its ``val_transforms`` / ``train_transforms`` are timm's transforms.

    Note: like timm's transforms it does not convert greyscale/RGBA images; convert to RGB first
    (``pipeline`` does this itself).
    """
    config = getattr(model, "config", model)
    pretrained_cfg = getattr(config, "pretrained_cfg", None)
    if not pretrained_cfg:
        raise ValueError("config has no pretrained_cfg; build the model with esam_hf.models.create_model")
    return TimmWrapperImageProcessor(pretrained_cfg=dict(pretrained_cfg), architecture=config.architecture)


def _check_class_names(class_names: Sequence[str]) -> list:
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty")
    if len(set(names)) != len(names):
        raise ValueError("class_names must be unique (label2id maps each name to one id)")
    return names


def _check_model_name(model_name: str) -> None:
    # "hf-hub:..." / "local-dir:..." names are resolved (and validated) by timm itself.
    if ":" in model_name or timm.is_model(model_name):
        return
    known = sorted(set(timm.list_models()) | set(CIFAR_MODELS))
    close = difflib.get_close_matches(model_name, known, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(f"Unknown model {model_name!r}: not a timm model nor one of {', '.join(CIFAR_MODELS)}.{hint}")


def _check_serialisable(model_args: Dict[str, Any]) -> None:
    # config.json must hold them; failing here beats failing at the first checkpoint save.
    for key, value in model_args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"timm kwarg {key!r}={value!r} is not JSON-serialisable, so it cannot be saved") from e


def _export_pretrained_cfg(timm_model: torch.nn.Module, num_classes: int) -> Dict[str, Any]:
    """timm's pretrained_cfg without weight-source fields, with the data config timm resolves for
    this model instance, JSON-normalised so the in-memory config equals a reloaded one."""
    cfg = {k: v for k, v in timm_model.pretrained_cfg.items() if k != "state_dict"}
    cfg = filter_pretrained_cfg(cfg, remove_source=True, remove_null=True)
    cfg.update(timm.data.resolve_data_config({}, model=timm_model))
    cfg["num_classes"] = num_classes
    return json.loads(json.dumps(cfg))


def _empty_wrapper(config: TimmWrapperConfig) -> TimmWrapperForImageClassification:
    """The HF wrapper built on the meta device: nothing is allocated and transformers skips its
    weight init, as in ``from_pretrained``; the caller then sets the real ``timm_model``. A CIFAR
    backbone gets the subclass whose ``save_pretrained`` saves its code with it (remote code)."""
    from .modeling_esam_cifar import TimmWrapperForImageClassification as CifarTimmWrapper

    cls = (CifarTimmWrapper if config.architecture.split(".")[0] in CIFAR_MODELS
           else TimmWrapperForImageClassification)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device("meta"))
        try:  # transformers' guard for models that call linspace(...).item() in __init__
            from transformers.initialization import meta_device_safe_creation_ops

            stack.enter_context(meta_device_safe_creation_ops())
        except ImportError:
            pass
        return cls(config)
