"""`bigbatch check`: every problem of a recipe or a DeepSpeed JSON, one sentence each. From the top down: command (the
CLI), preflight (a recipe's checks, which `bigbatch train` runs too), dsjson (a DeepSpeed JSON: DeepSpeed's own parser
and what it lets through), rules (the value rules DeepSpeed's parser does not apply)."""
