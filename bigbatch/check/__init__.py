"""`bigbatch check`: every problem of a recipe or a DeepSpeed JSON, one sentence each (command), and the value rules
DeepSpeed's own parser does not apply (rules)."""
