"""Every name warm-hub gives a file or folder of its outputs, and every `WARM_HUB_*` environment variable.

One home, as huggingface_hub's `constants.py`: a module that writes a file and one that reads it import the same
name. Only names live here; the variables are read where they act, at call time (never at import).
"""

# Output layout of a merge (`warm-hub merge --out DIR`), read back by `push`, `inspect`, `evaluate` and `--resume`.
PARTIAL_SUFFIX = ".warm-hub-partial"  # DIR + this: the folder written into until the merge completes and renames it
OLD_SUFFIX = ".warm-hub-old"  # DIR + this: with --overwrite, the replaced output, deleted once the new one is in
LOCK_SUFFIX = ".warm-hub-lock"  # DIR + this: the lock file one writer of DIR holds (a second merge is refused)
JOURNAL_NAME = ".warm-hub-journal"  # in the partial folder: chunks done so far, for --resume; removed at the end
RECIPE_NAME = "warm_recipe.yaml"  # the merge recipe (ingredients, weights, shard hashes): marks a WARM output
SAFE_INDEX = "model.safetensors.index.json"  # the safetensors index of a sharded checkpoint (read and written)
SAFE_SINGLE = "model.safetensors"  # the weights of an unsharded checkpoint
CONFIG_NAME = "config.json"  # the transformers model config (read from ingredients, written to the output)
CARD_NAME = "README.md"  # the model card (written by merge and push, updated by evaluate)
EVAL_RESULTS_NAME = "eval_results.json"  # the evaluation document `evaluate` writes and the card reads
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter's config (read from LoRA ingredients, written by --as-adapter)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # a PEFT adapter's weights (read, and written by --as-adapter)

# Output layout of `warm-hub finetune --out DIR`.
RUN_CONFIG_NAME = "warm_finetune.yaml"  # the whole run's settings (marks DIR as a fine-tuning run)
MEMBER_CONFIG_NAME = "warm_member.yaml"  # one member's exact training settings, in its folder and on the Hub
SHARED_INIT_DIR = "shared-init"  # the shared initialisation (base + linear probe) every member starts from
FLIPPED_PAIRS_NAME = "flipped.jsonl"  # with --corrupt-labels: the pairs whose labels were swapped
CLEAN_PAIRS_NAME = "clean.jsonl"  # with --corrupt-labels: the pairs left as they were

# Output layout of `warm-hub demo --out DIR` (the WARM model in DIR/warm/ is a merge output, as above).
DEMO_CONFIG_NAME = "demo_config.json"  # the demo's settings
PLOT_NAME = "eval.png"  # beside the WARM model's eval results: the accuracy plot its card shows
SEEDS_DIR = "seeds"  # with several seeds: DIR/seeds/seed-<s>/ holds each further seed's run
SEEDS_NAME = "seeds.json"  # with several seeds: the accuracies over seeds (mean and standard error)
BEST_OF_N_NAME = "best_of_n.json"  # the best-of-N comparison of the proxies

# Environment variables. Each is read when the code it steers runs, so a test or a caller may set it late.
DEBUG_ENV = "WARM_HUB_DEBUG"  # 1: the CLI shows tracebacks instead of one line on stderr
PULL_ENV = "WARM_HUB_PULL"  # how Hub ingredients are read: "stream" (HTTP Range, the default) or "download"
CPU_THREADS_ENV = "WARM_HUB_CPU_THREADS"  # CPU averaging threads (default: usable cores less one, 16 at most)
CPU_KERNEL_ENV = "WARM_HUB_CPU_KERNEL"  # "torch": average on CPU with torch instead of the compiled C kernel
BON_CACHE_ENV = "WARM_HUB_BON_CACHE"  # folder of cached best-of-N candidates (default $HF_HOME/warm-hub/best-of-n)
