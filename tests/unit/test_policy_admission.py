"""Memory admission: exclusivity, budget, available memory, GPU memory and stranded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.actions import Admit, Refuse
from policies.admission import Footprint, admit, auto_footprint_bytes

GB = 10**9
TOTAL = 512 * GB

big8 = Footprint("glm-8bit", 240 * GB, exclusive=True)
big4 = Footprint("glm-4bit", 120 * GB)
small = Footprint("qwen-small", 20 * GB)
coder = Footprint("coder", 60 * GB)


def decide(
    candidate: Footprint,
    resident: list[Footprint],
    *,
    available: int = 400 * GB,
    headroom: int = 16 * GB,
    budget: int | None = 440 * GB,
    gpu: dict[int, int] | None = None,
    stranded: int = 0,
) -> Admit | Refuse:
    return admit(candidate, resident, available, headroom, budget, gpu, stranded)


@pytest.mark.parametrize(
    ("candidate", "resident", "kwargs", "expected_reason"),
    [
        (big4, [], {}, None),
        (small, [big4], {}, None),
        (big8, [small], {}, "exclusive"),  # the candidate is exclusive
        (small, [big8], {}, "exclusive"),  # a resident is exclusive
        (big8, [big8], {}, None),  # a restart of itself replaces itself
        (big4, [coder, Footprint("x", 270 * GB)], {}, "budget"),  # 450 GB > 440 GB budget
        (big4, [coder], {"budget": None}, None),  # no budget configured
        (big4, [], {"available": 130 * GB}, "memory"),  # 120 + 16 headroom > 130
        (big4, [], {"available": 136 * GB}, None),  # exactly fits
        (
            big4,
            [],
            {"available": 100 * GB, "stranded": 245 * GB},
            "stranded",
        ),  # fits but for stranded
        (big4, [], {"available": 50 * GB, "stranded": 10 * GB}, "memory"),  # would not fit anyway
        (big4, [coder], {"stranded": 300 * GB}, "stranded"),  # budget minus stranded too small
    ],
)
def test_admission_table(
    candidate: Footprint,
    resident: list[Footprint],
    kwargs: dict[str, object],
    expected_reason: str | None,
) -> None:
    """Each start is admitted or refused for the reason a person would expect."""
    decision = decide(candidate, resident, **kwargs)  # type: ignore[arg-type]
    if expected_reason is None:
        assert isinstance(decision, Admit), decision
        assert decision.engine == candidate.engine
    else:
        assert isinstance(decision, Refuse), decision
        assert decision.reason == expected_reason, decision.message
        assert decision.engine == candidate.engine


def test_the_two_models_panic_is_refused_with_numbers() -> None:
    """The 435 GB two-model case on a 512 GB Mac is refused, naming both sizes and the budget."""
    first = Footprint("glm-8bit", 245 * GB)
    second = Footprint("deepseek", 190 * GB)
    refused = admit(second, [first], 250 * GB, 16 * GB, 400 * GB, None)
    assert isinstance(refused, Refuse) and refused.reason == "budget"
    assert "190.0 GB" in refused.message and "245.0 GB" in refused.message
    assert "435.0 GB" in refused.message and "400.0 GB" in refused.message


def test_memory_refusal_names_need_and_available() -> None:
    """A start that does not fit says how much it needs and how much is available."""
    refused = decide(big4, [], available=100 * GB)
    assert isinstance(refused, Refuse)
    assert (
        "120.0 GB" in refused.message
        and "16.0 GB" in refused.message
        and "100.0 GB" in refused.message
    )


def test_stranded_refusal_says_a_reboot_helps() -> None:
    """A start blocked by stranded wired memory says so and that only a reboot frees it."""
    refused = decide(big4, [], available=100 * GB, stranded=245 * GB)
    assert isinstance(refused, Refuse)
    assert "245.0 GB" in refused.message and "reboot" in refused.message


def test_exclusive_refusal_names_who_holds_the_machine() -> None:
    """Refusing next to an exclusive engine names it and suggests switch."""
    refused = decide(small, [big8])
    assert isinstance(refused, Refuse)
    assert "glm-8bit" in refused.message and "llmctl switch qwen-small" in refused.message


@pytest.mark.parametrize(
    ("footprint", "gpu_free", "expected"),
    [
        (Footprint("vllm", 60 * GB, gpu_devices=(0,)), {0: 70 * GB}, None),
        (Footprint("vllm", 60 * GB, gpu_devices=(0,)), {0: 50 * GB}, "gpu"),
        (
            Footprint("vllm", 120 * GB, gpu_devices=(0, 1)),
            {0: 70 * GB, 1: 70 * GB},
            None,
        ),  # 60 per GPU
        (Footprint("vllm", 120 * GB, gpu_devices=(0, 1)), {0: 70 * GB, 1: 50 * GB}, "gpu"),
        (Footprint("vllm", 60 * GB, gpu_devices=(2,)), {0: 80 * GB}, "gpu"),  # device not visible
        (
            Footprint("vllm", 10 * GB, gpu_devices=(0,), gpu_bytes_per_device=72 * GB),
            {0: 70 * GB},
            "gpu",
        ),
        (Footprint("vllm", 60 * GB, gpu_devices=(0,)), None, None),  # no NVML: not checked
    ],
)
def test_gpu_memory_must_cover_the_engine(
    footprint: Footprint, gpu_free: dict[int, int] | None, expected: str | None
) -> None:
    """A GPU engine starts only if each of its devices has room for its share."""
    decision = decide(footprint, [], gpu=gpu_free)
    if expected is None:
        assert isinstance(decision, Admit), decision
    else:
        assert isinstance(decision, Refuse) and decision.reason == expected, decision


def test_unchecked_gpu_is_said_in_the_admission() -> None:
    """Without a GPU reading the admission message says GPU memory was not checked."""
    decision = decide(Footprint("vllm", 60 * GB, gpu_devices=(0,)), [], gpu=None)
    assert isinstance(decision, Admit) and "not checked" in decision.message


@pytest.mark.parametrize(
    ("weights", "factor", "expected"), [(100 * GB, 1.2, 120 * GB), (10, 1.0, 10), (0, 1.5, 0)]
)
def test_auto_footprint(weights: int, factor: float, expected: int) -> None:
    """The automatic footprint is the weights times the factor, rounded up."""
    assert auto_footprint_bytes(weights, factor) == expected


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: auto_footprint_bytes(10, 0.9), "factor must be >= 1.0"),
        (lambda: auto_footprint_bytes(-1), "weights_bytes must be >= 0"),
        (lambda: Footprint("x", -5), "must be an integer >= 0"),
        (lambda: Footprint("", 5), "non-empty engine name"),
        (lambda: Footprint("x", 5, gpu_devices=(-1,)), "device indexes >= 0"),
        (lambda: decide(small, [], budget=0), "budget_bytes must be > 0 or None"),
        (lambda: decide(small, [], available=-1), "available_bytes must be >= 0"),
    ],
)
def test_bad_inputs_are_named(call: object, needle: str) -> None:
    """Nonsense sizes fail with what is valid."""
    with pytest.raises(ValueError, match=needle):
        call()  # type: ignore[operator]


@given(reason=st.sampled_from(["exclusive", "budget", "memory", "stranded", "gpu"]), now_s=st.floats(0, 1000),
       deadline_s=st.floats(0, 1000))
def test_a_refused_start_waits_for_memory_until_its_deadline_but_never_for_exclusivity(reason, now_s, deadline_s) -> None:
    """Memory frees as other engines stop: a start asks again every 2 s at most, and never past the deadline.
    An exclusive conflict is refused at once: only a swap resolves it."""
    from policies.actions import WaitUntil
    from policies.admission import ADMISSION_RECHECK_S, after_refusal

    refusal = Refuse("big", reason, f"refused for {reason}")
    step = after_refusal(refusal, now_s, deadline_s)
    if reason == "exclusive" or now_s >= deadline_s:
        assert step is refusal
    else:
        assert isinstance(step, WaitUntil) and now_s < step.at_s <= min(deadline_s, now_s + ADMISSION_RECHECK_S)
