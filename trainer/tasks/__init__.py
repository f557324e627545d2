"""Tasks: the dataset schemas the trainer knows (``data.task``).

``build_task(cfg.data)`` gives the configured task; ``task.resolve(train_path)`` fills in what
it learns from the training file (class names of a text classification task). Checkpoints
store ``task.record()``; ``task_from_record`` rebuilds the task a checkpoint was trained on.
"""

from __future__ import annotations

from typing import Any, Mapping

from trainer.errors import CheckpointError, ConfigError
from trainer.tasks.arena import ArenaTask
from trainer.tasks.base import Task
from trainer.tasks.text_classification import TextClassificationTask

TASKS = ("arena", "text_classification")

__all__ = ["TASKS", "ArenaTask", "Task", "TextClassificationTask", "build_task", "task_from_record"]


def build_task(dcfg: Mapping[str, Any], class_names: list[str] | None = None) -> Task:
    """The task named by ``data.task`` with its data.* settings (class names unresolved unless
    given here or in ``data.class_names``)."""
    name = dcfg["task"]
    if name == "arena":
        return ArenaTask(dcfg["prompt_layout"])
    if name == "text_classification":
        names = class_names if class_names is not None else dcfg.get("class_names")
        return TextClassificationTask(dcfg["text_column"], dcfg["label_column"],
                                      None if names is None else list(names))
    raise ConfigError(f"config key 'data.task' = {name!r}: expected one of {list(TASKS)}")


def task_from_record(record: Mapping[str, Any], dcfg: Mapping[str, Any], where: str) -> Task:
    """The task a checkpoint recorded, checked against what the config would build."""
    if record.get("name") != dcfg["task"]:
        raise CheckpointError(f"{where} was trained on task {record.get('name')!r}, but data.task="
                              f"{dcfg['task']!r}; drop the override (the checkpoint's task is used)")
    task = build_task(dcfg, class_names=record.get("class_names"))
    if task.record() != dict(record):
        raise CheckpointError(f"{where} was trained with task settings {dict(record)}, the config gives "
                              f"{task.record()}")
    return task
