"""The logic behind ``sapo-megatron <command>`` and the ``tools/*.py`` scripts, which share it.

Each module has ``main(argv=None, prog=None) -> int`` with its own argparse parser (an epilog
with an example), and imports torch / Megatron / matplotlib only inside ``main``, so that
``sapo-megatron --help`` stays fast. ``sapo_megatron.cli`` maps command names to these modules;
``tools/convert_checkpoint.py``, ``tools/compare_logits.py``, ``tools/plot_metrics.py`` and
``examples/ablations/sweep.py`` are two-line wrappers that keep their old arguments.
"""
