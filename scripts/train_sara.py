"""SaRA: fine-tune a model's small weights on captioned images (diffusers' text-to-image flags, plus --threshold,
--progressive_fraction and --lambda_rank).

    accelerate launch scripts/train_sara.py --pretrained_model_name_or_path tinyworld \
        --train_data_dir my_images/ --threshold 2e-3 --output_dir out/sara
    # several GPUs: accelerate launch --multi_gpu --num_processes 4 scripts/train_sara.py ...
    # several CPU processes: torchrun --nproc_per_node 2 scripts/train_sara.py ...

Images need captions (metadata.jsonl rows or a .txt beside each image). The result, out/sara/sara_delta.safetensors,
loads onto a plain pipeline with ``genreg.methods.sara.load_into(pipe, "out/sara/sara_delta.safetensors")``.
Without --learning_rate, the paper's rule 1e-3 exp(-350 threshold) sets it.
"""

from genreg.cli import trainer_main

if __name__ == "__main__":
    trainer_main("sara")
