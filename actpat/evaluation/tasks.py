"""Zero-shot tasks as lm-evaluation-harness task configs that read the local JSONL files offline.

Each ``ZeroShotTask`` gives two lm-eval task configs (plain dicts, passed to ``simple_evaluate``):

* ``local_config(path)``: ``dataset_path: json`` with ``data_files`` pointing at
  ``<data-dir>/<name>/<split>.jsonl`` (field names as documented in the data's PROVENANCE.md);
* ``hub_config()``: the same prompt on the hub dataset lm-eval 0.4.13 itself uses.

Prompts, choices and targets mirror lm-eval 0.4.13's own task YAMLs (``super_glue/boolq``,
``piqa``, ``siqa``, ``hellaswag``, ``mmlu/default``) so that acc / acc_norm line up with published
harness numbers. Known deviations, both forced by the local files:

* hellaswag local: the rows are already lm-eval-preprocessed and ``ctx`` is ``ctx_a + " " + ctx_b``
  with ``ctx_b`` not capitalised (lm-eval capitalises it), so the query is
  ``"{activity_label}: {ctx}"`` without that capitalisation;
* boolq local: the label is the boolean ``answer`` field (SuperGLUE's ``label`` is the same bit).

MMLU is one task over all subjects: each item's context starts with lm-eval's per-subject
description ("The following are multiple choice questions (with answers) about X.\\n\\n"), so the
scored strings are lm-eval's; acc over the items equals lm-eval's size-weighted group mean.
The query of every task is ``data.datasets.PROMPTS`` (one prompt per dataset, used for profiling,
calibration and evaluation alike). Adding a task is one ``register_task(ZeroShotTask(...))`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..data.datasets import CHOICES, GOLD, PROMPTS, hellaswag_clean
from ..registry import Registry

METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
           {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _hellaswag_hub_docs(dataset):
    """lm-eval's hellaswag ``process_docs`` for the raw hub rows."""
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [hellaswag_clean(e) for e in doc["endings"]],
                "gold": int(doc["label"])}
    return dataset.map(one)


def _hellaswag_local_docs(dataset):
    """Local rows are already preprocessed (PROVENANCE.md section 6); only build the fields."""
    def one(doc):
        return {"query": PROMPTS["hellaswag"](doc), "choices": CHOICES["hellaswag"](doc),
                "gold": GOLD["hellaswag"](doc)}
    return dataset.map(one)


@dataclass(frozen=True)
class ZeroShotTask:
    name: str  # actpat name == data-dir folder
    split: str  # evaluated split (local file <split>.jsonl and hub split)
    hub: tuple[str, str | None]  # (dataset_path, dataset_name) as in lm-eval's YAML
    common: dict  # doc_to_text / doc_to_choice / target_delimiter / process_docs shared by both
    local_target: str | Callable  # doc_to_target for the local rows (template or function)
    hub_target: str | Callable  # doc_to_target for the hub rows
    local_extra: dict = field(default_factory=dict)
    hub_extra: dict = field(default_factory=dict)

    def _base(self) -> dict:
        return {"task": f"actpat_{self.name}", "output_type": "multiple_choice",
                "test_split": self.split, "metric_list": METRICS, **self.common}

    def local_config(self, path: str) -> dict:
        return {**self._base(), "dataset_path": "json",
                "dataset_kwargs": {"data_files": {self.split: str(path)}},
                "doc_to_target": self.local_target, **self.local_extra}

    def hub_config(self) -> dict:
        repo, name = self.hub
        return {**self._base(), "dataset_path": repo, "dataset_name": name,
                "doc_to_target": self.hub_target, **self.hub_extra}


TASKS: Registry[ZeroShotTask] = Registry("zero-shot task")


def register_task(task: ZeroShotTask) -> ZeroShotTask:
    return TASKS.add(task.name, task)


# Local rows: the prompt, the choices and the gold index are data.datasets' PROMPTS, CHOICES
# and GOLD (QA calibration appends the same gold choice). Hub rows keep lm-eval's own fields
# where they differ from the local files (boolq's label, hellaswag's raw ctx_a / ctx_b).
register_task(ZeroShotTask(
    "boolq", "validation", ("aps/super_glue", "boolq"),
    {"doc_to_text": PROMPTS["boolq"], "doc_to_choice": CHOICES["boolq"]},
    local_target=GOLD["boolq"], hub_target="label",
))
register_task(ZeroShotTask(
    "piqa", "validation", ("baber/piqa", None),
    {"doc_to_text": PROMPTS["piqa"], "doc_to_choice": CHOICES["piqa"]},
    local_target=GOLD["piqa"], hub_target=GOLD["piqa"],
))
register_task(ZeroShotTask(
    "siqa", "validation", ("lighteval/siqa", None),
    {"doc_to_text": PROMPTS["siqa"], "target_delimiter": " ", "doc_to_choice": CHOICES["siqa"]},
    local_target=GOLD["siqa"], hub_target=GOLD["siqa"],
))
register_task(ZeroShotTask(
    "hellaswag", "validation", ("Rowan/hellaswag", None),
    {"doc_to_text": "{{query}}", "doc_to_choice": "choices"},
    local_target="{{gold}}", hub_target="{{gold}}",
    local_extra={"process_docs": _hellaswag_local_docs},
    hub_extra={"process_docs": _hellaswag_hub_docs},
))
register_task(ZeroShotTask(
    "mmlu", "test", ("cais/mmlu", "all"),
    {"doc_to_text": PROMPTS["mmlu"], "doc_to_choice": CHOICES["mmlu"]},
    local_target=GOLD["mmlu"], hub_target=GOLD["mmlu"],
))
