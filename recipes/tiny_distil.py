"""tiny_distil: the demo's model as a teacher, distilled into a 1-layer student on CPU (LAMB, global batch 4,096,
ZeRO-1), as DistilBERT did at scale: the student starts from every other teacher layer (here layer 0), learns from
the teacher's soft targets at temperature 2 (Hinton et al. 2015), the masked-LM labels and the last hidden states.

    bigbatch train tiny --run-dir runs/teacher                            # the teacher (make demo trains one too)
    bigbatch train tiny_distil --distill.teacher=runs/teacher --run-dir runs/student
    bigbatch compress runs/student --out runs/student-int8 --prune 0.5 --quantize int8-dynamic

The student takes the teacher's tokenizer (data.tokenizer is left empty), so data.vocab_size here is a placeholder.
"""

import dataclasses
import sys
from pathlib import Path

from bigbatch.config import DistillConfig
from bigbatch.config.files import load_recipe_file

TINY = load_recipe_file(Path(__file__).with_name("tiny.py"))
RECIPE = dataclasses.replace(
    TINY,
    name="tiny_distil",
    model=dataclasses.replace(TINY.model, num_layers=1),  # half the teacher's depth, its width
    distill=DistillConfig(teacher="", temperature=2.0, alpha_kd=1.0, alpha_hard=0.5, alpha_hidden=0.5,
                          init="teacher_layers"),
)

if __name__ == "__main__":
    from bigbatch.cli import run_recipe

    sys.exit(run_recipe(__file__))
