"""Score Forgetting Distillation: forget a concept while distilling the model into a one-step generator, from prompts
alone (diffusers' flag names, plus --forget, --override and the prompt sets).

    accelerate launch scripts/train_sfd.py --pretrained_model_name_or_path tinyworld --forget star --override circle \
        --output_dir out/no-star
    # with your own prompts: --forget_prompts forget.txt --remain_prompts remain.txt (one prompt per line)
    # several CPU processes: torchrun --nproc_per_node 2 scripts/train_sfd.py ...

The result, out/no-star/generator, loads with ``genreg.pipelines.OneStepPipeline.from_pretrained(...)`` and draws
an image in one network evaluation.
"""

from genreg.cli import trainer_main

if __name__ == "__main__":
    trainer_main("sfd")
