"""Data: the example format, readers that produce it, and the collator that batches it.

Every reader yields dicts in one format: `task_name`, `instruction`, `input`, `output` (str, the training target),
optionally `category`, `choices` (answer options for rank classification) and `references` (all acceptable outputs,
for evaluation).
"""
