"""A one-step text-to-image pipeline for a distilled generator (e.g. Score Forgetting Distillation's):
x0 = G(sqrt(1 - a_init) z, t_init, c), decoded by the VAE. Load it with ``OneStepPipeline.from_pretrained(path)``.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from genreg.sd import decode_latents, to_space


class OneStepPipeline(StableDiffusionPipeline):
    """One network evaluation per image: the generator maps noise at ``t_init`` to the image's latent. There is no
    guidance to apply (the generator was distilled from the guided teacher), so CFG and Adaptive Guidance do not
    apply, and ``num_inference_steps`` can only be 1."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        t_init: int = 440,
    ):
        super().__init__(
            vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder, False
        )
        self.register_to_config(t_init=int(t_init))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ):
        """Draws images in one step; ``latents`` is the noise z (default: drawn from ``generator``)."""
        if num_inference_steps != 1 or guidance_scale not in (None, 0, 1) or "guidance" in kwargs:
            raise ValueError(
                "this is a one-step generator: it takes no guidance (CFG, Adaptive Guidance) and no step count; "
                "call it with the prompt only"
            )
        if kwargs:
            raise ValueError(f"OneStepPipeline does not take {', '.join(sorted(kwargs))}")
        device = self._execution_device
        cond, _ = self.encode_prompt(prompt, device, num_images_per_prompt, False, prompt_embeds=prompt_embeds)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (
            len(cond),
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        z = (
            latents.to(device, cond.dtype)
            if latents is not None
            else randn_tensor(shape, generator, device, cond.dtype)
        )
        t_init = self.config.t_init
        alpha_bar = self.scheduler.alphas_cumprod.to(device)[t_init]
        x_init = (1 - alpha_bar).sqrt().to(z.dtype) * z
        t = torch.full((len(z),), t_init, device=device, dtype=torch.long)
        pred = self.unet(x_init, t, cond).sample
        x0 = to_space(pred.float(), x_init.float(), alpha_bar, self.scheduler.config.prediction_type, "x0")
        images = decode_latents(self, x0.to(self.vae.dtype), output_type)
        self.maybe_free_model_hooks()
        return (
            StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None) if return_dict else (images, None)
        )
