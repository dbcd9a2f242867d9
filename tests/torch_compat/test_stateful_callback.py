"""anomalib 0.x's callback driven by hand through a hypothesis state machine, against an
independent numpy model of SPEC (issue 20; the machine is ``tests/callback_machine.py``).

``tests_anomalib`` runs the same machine with anomalib 0.7's own callback as the oracle.
Derandomized and bounded (each machine well under a minute on 2 cores).
"""

from __future__ import annotations

from tests.callback_machine import (
    CallbackMachine,
    NumpyOracle,
    machine_settings,
    machine_test_cases,
)


class CallbackAgainstSpec(CallbackMachine):
    """Every mutation and phase, validation epochs always completed (``machine_test_cases`` adds the
    variants: abandoned epochs, the accelerator path, a converted module)."""

    def make_oracle(self, image_t, pixel_t):
        return NumpyOracle(image_t, pixel_t)


class PickledCallback(CallbackAgainstSpec):
    """The callback is pickled too (Lightning's ``ddp_spawn`` pickles the trainer's)."""

    COPY_CALLBACK = "pickle"


(
    TestCallbackAgainstSpec,
    TestAbandonedEpochs,
    TestOnAnAccelerator,
    TestConvertedModule,
) = machine_test_cases(CallbackAgainstSpec, max_examples=40)

PickledCallback.TestCase.settings = machine_settings(max_examples=30)
TestPickledCallback = PickledCallback.TestCase
