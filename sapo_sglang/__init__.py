"""Code that runs INSIDE an SGLang server, importable in SGLang's own environment.

Nothing here imports ``sapo_megatron`` (whose import checks for Megatron-Core), only torch, numpy,
safetensors and the standard library, so ``pip install --no-deps sapo_megatron`` into the
server's virtualenv (or this directory on its ``PYTHONPATH``) is all a server needs.
"""
