"""Trains eagle:smollm2, the feature drafter shipped for SmolLM2-135M-Instruct.

  python run.py --config=experiments/train_eagle_smollm2.py
  python run.py --config=experiments/train_eagle_smollm2.py:tiny    # CI-sized

Self-distillation (flashspec_jax/distill.py): SmolLM2 answers greedily, 512 at
a time, every tune-split prompt (chat, code, edit; never a held-out one) and
every later user turn of the tune split's chats, each alone as a prompt, none
from a conversation any part of which is held out; then the drafter learns
its next-token distributions with 4-step rollouts, batch 32, for 3,200 steps.
It reads EAGLE-3's fused features, the target's streams after layers 2, 15
and 27 (low, middle and high; its weights file records them);
--config.train.feature_layers= (empty) trains one of the final-normed state
alone, as the weights shipped before did.
Training never sees a prompt twice, nor one that repeats a held-out prompt
word for word. --config.train.later_chat_turns=0 leaves the later turns out.
It runs through run.py like every experiment, so the results file records the
command, sha and device like the others, and the config's flags and sweeps apply.
Writes flashspec_jax/weights/eagle_smollm2/model.safetensors and
results/train_eagle_smollm2/ (loss curve, acceptance per draft position on the
validation split of whole conversations).
Expected on one H100: 18,722 answers in about 100 s, then about 5 steps a
second. The shipped weights are this recipe stopped by
--config.train.max_seconds=540 at step 2,660 (loss 1.62 at that step, greedy
tau 3.48 on the validation chats); the model card beside them says what they
give on held-out prompts, and that the whole schedule (--config.train.steps=3200
--config.train.max_seconds=700, 656 s of training on an H100) made a drafter
only 1.7% faster greedy and no faster at temperature 1. A run stopped so resumes
from --config.train.workdir.
--config.train.sampled_answers=N adds N answers to each prompt sampled at
temperature 1; with N=1 (on an H100, about 3 minutes of answering and 11 of
training) a last-layer drafter was no faster than the one then shipped on
held-out prompts, as the model card shows.
The :tiny variant answers a few short chat prompts with 16 tokens and trains
for 12 steps on CPU (about a minute) a drafter of fused features restricted to
the answers' 4,096 most frequent tokens (--config.train.draft_vocabulary); its
loss falls.
"""

from flashspec_jax.config import base_config, is_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "train_eagle_smollm2"
  config.kind = "train_drafter"
  config.target = "smollm2_135m"
  config.prompts.sets = "chat,code,edit"
  config.train.prompts_per_set = 100_000  # the whole tune split of each set
  config.train.later_chat_turns = 100_000  # every one there is (13,589)
  config.train.generate_batch = 512
  config.train.batch_size = 32
  config.train.steps = 3200
  config.train.feature_layers = "2,15,27"
  config.train.output = "flashspec_jax/weights/eagle_smollm2/model.safetensors"
  config.train.workdir = "checkpoints/train_eagle_smollm2"
  if is_tiny(arg):
    config.experiment += "_tiny"
    config.prompts.sets = "chat"
    config.train.prompts_per_set = 12
    config.train.later_chat_turns = 0
    config.train.max_prompt_tokens = 64
    config.train.answer_tokens = 16
    config.train.generate_batch = 12
    config.train.max_tokens = 80
    config.train.validation_fraction = 0.25
    config.train.rollout_steps = 3
    config.train.draft_vocabulary = 4096  # the restricted path, end to end
    config.train.steps = 12
    config.train.batch_size = 4
    config.train.warmup_steps = 2
    config.train.log_every = 1
    config.train.workdir = config.train.output = ""  # beside the results file
  return config
