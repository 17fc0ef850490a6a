"""HiFi Tuner (Wang et al., 2023; arXiv 2312.00079): a subject learnt as vectors in the text encoder's output space
that replace a prompt encoding's last n positions, under a mask-weighted diffusion loss pulled toward the empty
prompt's last positions (Eqs. 5-6), then refined once per sampling step and sampled step by step (Eq. 7, Alg. 1);
reference-guided generation guides the subject's region by its closest, aligned, inverted training image (Alg. 2);
subject replacement puts the subject in place of an object of a real image by inversion, null-text optimization and
cross-attention injection (Alg. 3).

No official code exists: this is genreg's reading of the paper (see the research notes); where the paper is silent
(w_s, the mask's resizing and normalisation) the choices are named in the config and in ``masked_mse``.
The DreamBooth variant (``--variant dreambooth``) tunes the UNet, whole or LoRA, under the same mask instead.
"""

from __future__ import annotations

from ...registry import Method, register
from .config import HiFiTunerConfig
from .reference import Reference, ReferenceGuidance, align_masks, reference_guided, warp
from .replace import Replacement, replace_subject, token_alignment
from .subject import SUBJECT_FILE, HiFiSubject, empty_tail, generate, replace_last
from .trainer import SubjectObjective, masked_mse, row_update, train_dreambooth, train_hifi_tuner

METHOD = register(
    Method(
        name="hifi-tuner",
        kind="trainer",
        title="HiFi Tuner",
        help="learn a subject as encoder-output vectors with its mask, pulled toward the empty prompt, refined per "
        "sampling step (Wang et al., 2023)",
        config=HiFiTunerConfig,
        run=train_hifi_tuner,
        train_defaults={"max_train_steps": 1000, "learning_rate": 5e-3, "adam_weight_decay": 0.0},
    )
)

__all__ = [
    "METHOD",
    "SUBJECT_FILE",
    "HiFiSubject",
    "HiFiTunerConfig",
    "Reference",
    "ReferenceGuidance",
    "Replacement",
    "SubjectObjective",
    "align_masks",
    "empty_tail",
    "generate",
    "masked_mse",
    "reference_guided",
    "replace_last",
    "replace_subject",
    "row_update",
    "token_alignment",
    "train_dreambooth",
    "train_hifi_tuner",
    "warp",
]
