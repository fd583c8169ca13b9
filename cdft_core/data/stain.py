"""HED stain jitter (``--augment paper+hed``): random stain strengths, as slides from another lab would have.

H&E slides differ from lab to lab, scanner to scanner, in how much haematoxylin and eosin
the tissue took up; a model trained on one lab's colours can fail on another's. Tellez et
al. (2018, "Whole-slide mitosis detection in H&E breast histology using PHH3 as a
reference to train distilled stain-invariant convolutional networks") simulate that
spread: separate each pixel into its stain amounts by colour deconvolution (Ruifrok &
Johnston's Haematoxylin-Eosin-DAB basis, scikit-image's :func:`~skimage.color.rgb2hed`),
perturb each stain channel ``c`` of the whole image by one draw,

    ``s_c' = alpha_c * s_c + beta_c``,  ``alpha_c ~ U(1 - sigma, 1 + sigma)``,  ``beta_c ~ U(-sigma, sigma)``,

and compose back to RGB (:func:`~skimage.color.hed2rgb`, clipped to ``[0, 1]``), here
rounded to ``uint8``. ``sigma`` is 0.05 by default (:data:`SIGMA`, Tellez et al.'s "light"
setting).

``beta`` is an optical density (natural log): a shift of 0.05 dims or brightens a stain
by about 5 %. scikit-image (0.19 and later) expresses stain amounts as optical densities
divided by ``ln(1e6)`` (about 13.8), so the drawn shift is divided by that factor before it
is added (:data:`OD_SCALE`); adding ``beta = 0.05`` in scikit-image's units directly would
shift a stain by an optical density of 0.69 and move a channel by 30-45 grey levels on
average — far from "light". ``alpha`` is a ratio and needs no conversion. Deconvolution
clips negative stain amounts to 0, so even ``alpha = 1, beta = 0`` moves a colour outside
the H-E-D cone slightly (neutral greys: ``(240, 240, 240)`` comes back as ``(240, 235, 239)``).

The six numbers (three ``alpha``, then three ``beta``) come from torch's global CPU
generator, like every other random draw of the training pipeline: seeded per (seed,
epoch, image) by :class:`~cdft_core.training.loaders.SeededAugmentation`, the jitter is
reproducible and independent of the number of loader workers. :class:`HedJitter` holds
only ``sigma`` and imports scikit-image when called, so it pickles into worker processes.

scikit-image is the optional extra ``stain`` (``pip install 'cdft[stain]'``);
:func:`require_skimage` is what a run checks before any work.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cdft_core.errors import UsageError

#: the default half-width of the jitter (Tellez et al., 2018)
SIGMA = 0.05
#: scikit-image's stain amounts per unit of natural-log optical density (1 / ln(1e6))
OD_SCALE = 1.0 / math.log(1e6)


def require_skimage() -> None:
    """Raise a one-line :class:`UsageError` naming the extra to install when scikit-image is missing."""
    try:
        import skimage.color  # noqa: F401
    except ImportError:
        raise UsageError("--augment paper+hed needs scikit-image for its colour deconvolution; install it with "
                         "pip install 'cdft[stain]', or use --augment paper") from None


class HedJitter:
    """``uint8 3×H×W`` RGB in, the same image with randomly scaled and shifted H, E and D stains out.

    Every pixel is changed by the same six draws, so shapes, edges and positions stay
    where they were: only colours move (see the module docstring for the definition).
    """

    def __init__(self, sigma: float = SIGMA) -> None:
        if not 0 <= sigma < 1:
            raise UsageError(f"the HED jitter's sigma must be in [0, 1), got {sigma!r}")
        require_skimage()
        self.sigma = float(sigma)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)``, three each (H, E, D), from torch's global generator; ``beta`` in
        scikit-image's stain units (an optical density of at most ``sigma``)."""
        u = torch.rand(2, 3, dtype=torch.float64)
        return 1 + self.sigma * (2 * u[0] - 1), self.sigma * OD_SCALE * (2 * u[1] - 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.draw()
        return jitter_hed(image, alpha, beta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def jitter_hed(image: torch.Tensor, alpha: Any, beta: Any) -> torch.Tensor:
    """``image`` (``uint8 3×H×W``) with stain ``c`` set to ``alpha[c] * s_c + beta[c]`` (H, E, D order)."""
    import numpy as np
    from skimage.color import hed2rgb, rgb2hed

    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"HED jitter needs a uint8 3xHxW RGB image, got {image.dtype} {tuple(image.shape)}")
    rgb = image.detach().cpu().permute(1, 2, 0).numpy()  # H×W×3 uint8: rgb2hed scales it to [0, 1]
    stains = rgb2hed(rgb) * np.asarray(alpha, dtype=np.float64) + np.asarray(beta, dtype=np.float64)
    out = np.rint(hed2rgb(stains) * 255.0).astype(np.uint8)  # hed2rgb clips to [0, 1]
    result = torch.from_numpy(out).permute(2, 0, 1).contiguous()
    if type(image) is not torch.Tensor:  # a tv_tensors.Image stays one
        from torchvision import tv_tensors

        return tv_tensors.wrap(result, like=image)
    return result
