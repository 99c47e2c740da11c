"""The PEFT plugin: one package per method, each registering itself with PEFT when imported.

``_base`` holds what every method shares (config fields and checks, the tuner, the additive layer
with merge/unmerge, quantized bases, registration); ``gated`` is the one layer the three
allocation methods (AutoLoRA, PRILoRA, HeteroLoRA) are policies over.
"""

from . import rlora, autolora, prilora, heterolora  # noqa: F401  (registers the methods)
