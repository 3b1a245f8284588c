"""For the crash tests: run `hpt-trl train` (`python -m killing_save train ...`), but SIGKILL the process during a save,
as a preemption would: `HPT_KILL_IN_SAVE=final` at the start of the final save into output_dir (after the last
checkpoint, before anything of it is written), `HPT_KILL_IN_SAVE=checkpoint-N` after checkpoint-N's model is written
and before its `trainer_state.json` (a torn checkpoint); `HPT_KILL_AT_STEP=N` at the end of optimizer step N, before
its checkpoint would be saved."""

import os
import signal
import sys

from transformers import Trainer, TrainerCallback

from hpt_trl import HPTTrainer
from hpt_trl.cli import main

WHEN = os.environ.get("HPT_KILL_IN_SAVE")
original_save_model = Trainer.save_model


def killing_save_model(self, output_dir=None, _internal_call=False):
    if WHEN == "final" and os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir):
        os.kill(os.getpid(), signal.SIGKILL)
    original_save_model(self, output_dir, _internal_call=_internal_call)
    if WHEN is not None and os.path.basename(os.path.normpath(output_dir)) == WHEN:
        os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if str(state.global_step) == os.environ.get("HPT_KILL_AT_STEP"):
            os.kill(os.getpid(), signal.SIGKILL)


Trainer.save_model = killing_save_model
if os.environ.get("HPT_KILL_AT_STEP"):
    original_init = HPTTrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(KillAtStep())

    HPTTrainer.__init__ = init

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
