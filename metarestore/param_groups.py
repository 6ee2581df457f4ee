"""The inner loop's learning-rate groups: the network's stages, named without torch. A leaf module, so that
the config (which validates ``meta.inner_lr``'s keys against them), the network (which names its modules
after them) and the adapter kinds (which select parameters by them) share one definition without an
import cycle, and validating a YAML file's groups needs no network."""

from __future__ import annotations

STAGES = ("intro", "encoder", "middle", "decoder", "ending")  # the U-Net's stages, input to output
INNER_LR_GROUPS = ("default", *STAGES, "condition")  # meta.inner_lr's keys ("condition": the told table)

_GROUP_OF_MODULE = {"downs": "encoder", "encoders": "encoder", "ups": "decoder", "decoders": "decoder"}


def param_group(name: str) -> str:
    """The inner-loop learning-rate group of a parameter: the U-Net stage it lives in."""
    head = name.split(".", 1)[0]
    return _GROUP_OF_MODULE.get(head, head)
