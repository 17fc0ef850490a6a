"""Textual inversion: learn a subject token from a few images (diffusers' textual-inversion flags).

    accelerate launch scripts/train_textual_inversion.py --train_data_dir my_subject/ --placeholder_token "<me>" \
        --initializer_token dog --output_dir out/me

The result, out/me/learned_embeds.safetensors, loads with ``pipe.load_textual_inversion("out/me")``.
"""

from genreg.cli import trainer_main

if __name__ == "__main__":
    trainer_main("textual-inversion")
