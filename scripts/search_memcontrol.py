"""MemControl: search which transformer blocks to fine-tune (and the learning rate) so that the model learns a
fine-tuning set without memorizing it (diffusers' text-to-image flags set the inner runs).

    python scripts/search_memcontrol.py --train_data_dir my_images/ --validation_data_dir held_out/ \
        --n_trials 20 --sampler tpe --output_dir out/memcontrol
    # more workers on the same study (one machine or many): start the same command with --storage URL and its
    # own --seed in each; every worker adds its trials to the one study

Writes out/memcontrol/pareto.json (masks, learning rates, both objectives, trainable fraction) and pareto.png.
"""

from genreg.cli import trainer_main

if __name__ == "__main__":
    trainer_main("memcontrol")
