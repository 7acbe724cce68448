"""The trained feature drafter eagle:smollm2 against AR, n-gram and layer-skip.

  python run.py --config=experiments/eagle_smollm2.py
  python run.py --config=experiments/eagle_smollm2.py:tiny    # CI-sized
  python run.py --config=experiments/eagle_smollm2.py --config.sampling.temperature=1
  python run.py --config=experiments/eagle_smollm2.py --config.batch_size=8 \
    --config.prompts.num_per_set=8
  python run.py --config=experiments/eagle_smollm2.py --config.methods=ar,eagle:smollm2 \
    --config.sweep=sampling.gamma=1,2,3,4,5,6,7,8
  python run.py --config=experiments/eagle_smollm2.py \
    --config.methods=ar,eagle:smollm2,eagle:fused \
    --config.eagle_checkpoint=fused=path/to/model.safetensors  # a newly trained drafter

Greedy, gamma 4, batch 1, 128 new tokens, five held-out prompts of each set
(chat, code, copy-heavy edit) that training never saw; every method runs on
the same prompts in one run. Writes results/eagle_smollm2/. The table gives
alpha, tau, tok/s and the speedup against AR.
Expected: on one H100 (bf16) eagle:smollm2 is the fastest method on chat and
code, about 2x AR over the three sets (n-gram is faster on edit); the figures
and what they mean are in flashspec_jax/weights/eagle_smollm2/MODEL_CARD.md.
Against gamma (the sweep above with --config.prompts.bucket=512, one H100):
1.53x AR at gamma 1, 1.97-2.01x at 3 to 5, 1.87-1.95x at 6 to 8.
On 2 CPU cores (f32) AR is the fastest over the three sets (eagle:smollm2
0.92x, faster only on edit), since there a verify pass of gamma + 1 tokens
costs several one-token steps (an eagle step about 87 ms against AR's 30); the
CPU file in results/ came from --config.prompts.num_per_set=2
--config.sampling.max_new_tokens=64, in about 2 minutes.
"""

from flashspec_jax.config import base_config, is_tiny, make_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "eagle_smollm2"
  config.methods = "ar,ngram:3,layer_skip:26,eagle:smollm2"
  config.prompts.split = "heldout"
  config.prompts.num_per_set = 5
  config.prompts.bucket = 256
  config.sampling.max_new_tokens = 128
  config.sampling.gamma = 4
  config.print_text = False
  if is_tiny(arg):
    make_tiny(config, synthetic=False)
    config.prompts.sets = "chat"
    config.methods = "ar,eagle:smollm2"
  return config
