"""Cross Initialization: learn a subject token from a few images (diffusers' textual-inversion flags).

    accelerate launch scripts/train_cross_init.py --train_data_dir my_subject/ --placeholder_token "<me>" \
        --subject_class person --output_dir out/me
    # several GPUs: accelerate launch --multi_gpu --num_processes 4 scripts/train_cross_init.py ...
    # several CPU processes: torchrun --nproc_per_node 2 scripts/train_cross_init.py ...

The result, out/me/learned_embeds.safetensors, loads with ``pipe.load_textual_inversion("out/me")``.
"""

from genreg.cli import trainer_main

if __name__ == "__main__":
    trainer_main("cross-init")
