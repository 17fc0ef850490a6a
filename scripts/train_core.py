"""CoRe: learn a subject token with context regularization, then optionally the UNet (diffusers' flag names).

    accelerate launch scripts/train_core.py --train_data_dir my_dog/ --placeholder_token "<my-dog>" \
        --initializer_token dog --prompt_set animate --output_dir out/my-dog [--unet_steps 1000]
    # several GPUs: accelerate launch --multi_gpu --num_processes 4 scripts/train_core.py ...

out/my-dog/learned_embeds.safetensors loads with ``pipe.load_textual_inversion("out/my-dog")``; with --unet_steps
the stage-2 UNet is out/my-dog/unet (``UNet2DConditionModel.from_pretrained("out/my-dog", subfolder="unet")``), or
with --unet_lora_rank LoRA weights (``pipe.load_lora_weights("out/my-dog")``).
"""

from genreg.cli import trainer_main

if __name__ == "__main__":
    trainer_main("core")
