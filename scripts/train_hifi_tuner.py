"""HiFi Tuner: learn a subject as encoder-output vectors, mask-guided and regularized, then one set per sampling step
(diffusers' flag names).

    accelerate launch scripts/train_hifi_tuner.py --train_data_dir my_dog/ --subject_word dog \
        --output_dir out/my-dog [--no-mask_guidance] [--num_inference_steps 50 --stepwise_steps 10]

Images need masks (masks/<image stem>.png, white = the subject) unless --no-mask_guidance; captions may hold {} where
the subject word goes. out/my-dog/hifi_subject.safetensors samples with
``genreg.methods.hifi_tuner.generate(pipe, HiFiSubject.load("out/my-dog"), "a dog on the beach")``.
"""

from genreg.cli import trainer_main

if __name__ == "__main__":
    trainer_main("hifi-tuner")
