"""Task registry: name -> "module:Class", imported lazily so a task's optional dependencies load only when used.

    from reasonlab.tasks import get_task, list_tasks
    task = get_task("gsm8k", fewshot=0)
"""

from __future__ import annotations

import difflib
import importlib

from reasonlab.tasks.base import Example, Score, Task, TaskError

TASKS: dict[str, str] = {
    "gsm8k": "reasonlab.tasks.gsm8k:GSM8KTask",
    "svamp": "reasonlab.tasks.svamp:SVAMPTask",
    "aqua": "reasonlab.tasks.aqua:AQuATask",
    "mathqa": "reasonlab.tasks.mathqa:MathQATask",
    "mmlu": "reasonlab.tasks.mmlu:MMLUTask",
    "arc-easy": "reasonlab.tasks.arc:ArcEasyTask",
    "arc-challenge": "reasonlab.tasks.arc:ArcChallengeTask",
    "wiki": "reasonlab.tasks.wiki:WikiTask",
    "arithmetic": "reasonlab.tasks.arithmetic:ArithmeticTask",
    "countdown": "reasonlab.tasks.countdown:CountdownTask",
    "subset-sum": "reasonlab.tasks.subset_sum:SubsetSumTask",  # polychromic testbed (enumerable solutions)
    "counting": "reasonlab.tasks.counting:CountingTask",  # latent bridge CPU task
    "word-recall": "reasonlab.tasks.words:WordRecallTask",  # latent bridge CPU task
    "number-words": "reasonlab.tasks.number_words:NumberWordsTask",  # latent bridge CPU task (non-copy)
    # owned by the TRM engineer
    "sudoku": "reasonlab.tasks.sudoku:SudokuTask",
    "arc-agi-1": "reasonlab.tasks.arc_agi:ArcAgiTask",
    "arc-agi-2": "reasonlab.tasks.arc_agi:ArcAgiTask",
    "grid-rules": "reasonlab.tasks.grid_rules:GridRulesTask",
}

# constructor arguments implied by the registry name (the caller's kwargs win)
TASK_KWARGS: dict[str, dict] = {
    "arc-agi-1": {"version": 1},
    "arc-agi-2": {"version": 2},
}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str, **kwargs) -> Task:
    """Instantiate a registered task; an unknown name is a one-line error naming the closest valid one."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1, cutoff=0.0)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TaskError(f"unknown task {name!r}; {hint}valid tasks: {', '.join(list_tasks())}")
    module_name, cls_name = TASKS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**{**TASK_KWARGS.get(name, {}), **kwargs})


__all__ = ["TASKS", "TASK_KWARGS", "Example", "Score", "Task", "TaskError", "get_task", "list_tasks"]
