"""Scenarios: which head each task uses and where its classes sit in it (van de Ven & Tolias 2019)."""
import re

import pytest

from clmtl.errors import ConfigError
from clmtl.stream.scenario import output_spaces, placed, plan_stream, require_own_heads
from clmtl.stream.tasks import TaskSpec

SEG_A = TaskSpec("seg_a", "segmentation", ("background", "disk", "square"))
SEG_B = TaskSpec("seg_b", "segmentation", ("background", "triangle"))
CLS_A = TaskSpec("cls_a", "classification", ("0", "1"))
CLS_B = TaskSpec("cls_b", "classification", ("2", "3", "4"))
DET_A = TaskSpec("det_a", "detection", ("cat", "dog"), category_ids=(17, 18))
DET_B = TaskSpec("det_b", "detection", ("car",), category_ids=(3,))


def heads_and_labels(tasks):
    return [(task.head, task.labels) for task in tasks]


def test_task_scenario_gives_every_task_its_own_head():
    tasks = plan_stream([SEG_A, CLS_A, SEG_B, CLS_B], "task")
    assert heads_and_labels(tasks) == [(0, (0, 1, 2)), (1, (0, 1)), (2, (0, 1)), (3, (0, 1, 2))]
    assert [space.classes for space in output_spaces(tasks)] == [SEG_A.classes, CLS_A.classes, SEG_B.classes,
                                                                  CLS_B.classes]


def test_class_scenario_shares_one_growing_head_per_kind_in_order_of_first_appearance():
    tasks = plan_stream([SEG_A, CLS_A, DET_A, SEG_B, CLS_B, DET_B], "class")
    assert heads_and_labels(tasks) == [(0, (0, 1, 2)), (1, (0, 1)), (2, (0, 1)),
                                       (0, (0, 3)),  # background stays 0, triangle is appended after square
                                       (1, (2, 3, 4)), (2, (2,))]
    seg, cls, det = output_spaces(tasks)
    assert seg.classes == ("background", "disk", "square", "triangle") and seg.initial == 3
    assert cls.classes == ("0", "1", "2", "3", "4") and cls.initial == 2
    assert det.classes == ("cat", "dog", "car") and det.category_ids == (17, 18, 3) and det.initial == 2


def test_domain_scenario_shares_one_head_of_the_same_classes():
    other = TaskSpec("cls_a2", "classification", ("0", "1"))
    tasks = plan_stream([CLS_A, other], "domain")
    assert heads_and_labels(tasks) == [(0, (0, 1)), (0, (0, 1))]
    assert output_spaces(tasks)[0].classes == ("0", "1")


def test_domain_split_shares_outputs_by_position_and_names_them_by_their_classes():
    """van de Ven's domain-incremental Split MNIST: output 0 is the first digit of every pair."""
    pairs = [TaskSpec(f"cls{i}", "classification", (str(2 * i), str(2 * i + 1))) for i in range(3)]
    tasks = plan_stream(pairs, "domain", positional=True)
    assert {task.head for task in tasks} == {0} and {task.labels for task in tasks} == {(0, 1)}
    assert output_spaces(tasks)[0].classes == ("0/2/4", "1/3/5")


@pytest.mark.parametrize("tasks, scenario, message", [
    ([CLS_A, TaskSpec("cls_c", "classification", ("1", "5"))], "class",
     "scenario class: tasks 'cls_a' and 'cls_c' (classification) both have class '1'"),
    ([SEG_A, TaskSpec("seg_c", "segmentation", ("background", "square"))], "class",
     "tasks 'seg_a' and 'seg_c' (segmentation) both have class 'square'"),
    ([CLS_A, CLS_B], "domain", "scenario domain: tasks 'cls_a' and 'cls_b' (classification) have different "
                               "classes ['0', '1'] and ['2', '3', '4']"),
    ([CLS_A], "joint", "scenario: must be one of task, class, domain"),
])
def test_streams_a_scenario_cannot_hold_are_one_line_errors(tasks, scenario, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        plan_stream(tasks, scenario)
    assert "\n" not in str(error.value)


def test_background_is_shared_not_an_overlap():
    tasks = plan_stream([SEG_A, SEG_B], "class")
    assert [task.labels[0] for task in tasks] == [0, 0]


def test_tasks_not_placed_take_the_head_of_their_position():
    assert heads_and_labels(placed([CLS_A, CLS_B])) == [(0, (0, 1)), (1, (0, 1, 2))]
    planned = plan_stream([CLS_A, CLS_B], "class")
    assert placed(planned) == planned


def test_strategies_that_need_the_task_at_test_time_refuse_shared_heads():
    require_own_heads("routing", plan_stream([CLS_A, CLS_B], "task"))
    with pytest.raises(ConfigError, match="strategy routing keeps state per task .* tasks cls_a, cls_b share head 0"):
        require_own_heads("routing", plan_stream([CLS_A, CLS_B], "class"))
