"""Trains eagle:smollm2, the feature drafter shipped for SmolLM2-135M-Instruct.

  python run.py --config=experiments/train_eagle_smollm2.py
  python run.py --config=experiments/train_eagle_smollm2.py:tiny    # CI-sized

Self-distillation (flashspec_jax/distill.py): SmolLM2 answers greedily, 512 at
a time, every tune-split prompt (chat, code, edit; never a held-out one) and
every later user turn of the tune split's chats, each alone as a prompt, none
from a conversation any part of which is held out; then the drafter learns
its next-token distributions with 4-step rollouts, batch 32, for 3,200 steps.
Training never sees a prompt twice, nor one that repeats a held-out prompt
word for word. --config.train.later_chat_turns=0 leaves the later turns out.
It runs through run.py like every experiment, so the results file records the
command, sha and device like the others, and the config's flags and sweeps apply.
Writes flashspec_jax/weights/eagle_smollm2/model.safetensors and
results/train_eagle_smollm2/ (loss curve, acceptance per draft position on the
validation split).
Expected on one H200: fewer answers than the shipped weights' 19,593 (their
first turns were filtered by record, not by conversation), in about 2 minutes,
then about 6 steps a second, 9 minutes for 3,200 steps; loss about 1.8 over the
last batches,
and a validation split of whole conversations (the shipped weights ran this
recipe in two parts, stopped by --config.train.max_seconds and resumed from
--config.train.workdir, when validation rows were drawn one by one and gave
greedy tau 3.14 on chat; the model card beside them says what they give, and
why that figure was too high). --config.train.sampled_answers=N adds N answers
to each prompt sampled at temperature 1; with N=1 (on an H100, about 3 minutes
of answering and 11 of training) the drafter was no faster than the shipped one
on held-out prompts, as the model card shows.
--config.train.feature_layers=2,15,27 trains a drafter of EAGLE-3's fused
features instead (the streams after layers 2, 15 and 27, low, middle and high;
its weights file records them); no such drafter has been trained on a GPU yet.
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
    config.train.feature_layers = "2,15,27"  # and the fused features
    config.train.steps = 12
    config.train.batch_size = 4
    config.train.warmup_steps = 2
    config.train.log_every = 1
    config.train.workdir = config.train.output = ""  # beside the results file
  return config
