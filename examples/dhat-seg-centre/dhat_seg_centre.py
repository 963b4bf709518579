"""An example dhat-seg attention plugin: "the object is in the middle".

A soft elliptical prior centred on the image, independent of the image content.
It is a baseline, not a segmenter: it shows the whole plugin contract in 40 lines.
"""

import torch

from dhat_seg import hookimpl
from dhat_seg.attention import AttentionContext, AttentionSpec


class CentrePrior:
    def __init__(self, radius: float):
        self.radius = radius

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device).view(h, 1)
        xs = torch.linspace(-1, 1, w, device=images.device).view(1, w)
        distance = (ys**2 + xs**2).sqrt() / self.radius
        prior = (1 - distance).clamp(0, 1)  # 1 in the centre, 0 beyond the radius
        return prior.expand(b, 1, h, w).contiguous()


def build(ctx: AttentionContext) -> CentrePrior:
    return CentrePrior(radius=float(ctx.options["radius"]))


@hookimpl
def register_attention_methods(register):
    register(
        AttentionSpec(
            name="centre",
            description="centred elliptical prior (example third-party plugin)",
            factory=build,
            version="1",
            kind="image",
            default_options={"radius": 0.8},
        )
    )
