"""bert_large_32k: BERT-large on the LAMB paper's pure 32K schedule, the second published plan beside bert_large's.

The LAMB paper (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", Table 1)
trains BERT-large at a global batch of 32,768 for 15,625 steps and reaches SQuAD v1.1 F1 91.35 (91.345): more steps
than the mixed-batch schedule of recipes/bert_large.py (8,599 steps, F1 90.58), a better F1. As in BERT (Devlin et
al. 2019) and the paper, the first 90% of the steps run at sequence length 128 and the last 10% at 512:
14,063 + 1,562 steps. LR 5e-3 with a warmup of 1/5 of the steps are the paper's square-root-scaled "untuned"
settings for 32K (Table 4: 5/(2^0 x 10^3), warmup ratio 1/5); the re-warmup of the seq-512 phase over its own first
fifth follows the mixed-batch recipe's practice and is our choice, not a published number. LAMB without the trust
ratio clamp, as in bert_large.

    bigbatch plan bert_large_32k
    bigbatch check bert_large_32k
    sbatch slurm/pretrain.sh bert_large_32k
"""

import dataclasses
import sys
from pathlib import Path

from bigbatch.config import BatchConfig, PhaseConfig, ScheduleConfig
from bigbatch.config.files import load_recipe_file

LARGE = load_recipe_file(Path(__file__).with_name("bert_large.py"))
STEPS, PHASE2_STEPS = 15_625 - 1_562, 1_562
RECIPE = dataclasses.replace(
    LARGE,
    name="bert_large_32k",
    optimizer=dataclasses.replace(LARGE.optimizer, lr=5e-3, lr_rule="none"),
    schedule=ScheduleConfig(steps=STEPS, warmup=0.2, decay="poly", power=0.5),
    batch=BatchConfig(global_batch=32768, micro_batch="auto"),
    phases=(PhaseConfig(global_batch=32768, seq_len=512, steps=PHASE2_STEPS, micro_batch="auto",
                        lr=5e-3, warmup=0.2, decay="poly", power=0.5),),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
