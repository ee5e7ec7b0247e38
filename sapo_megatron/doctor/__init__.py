"""``sapo-megatron doctor``: the train/inference mismatch of a trainer and a live server, before a run.

:mod:`.report` holds the maths (per-token gaps and routing counts -> figures, verdict, text);
:mod:`.measure` runs the trainer's step-0 rollout and log-prob passes to produce them;
``sapo_megatron/commands/doctor.py`` is the command.
"""
