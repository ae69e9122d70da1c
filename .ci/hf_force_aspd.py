"""pytest plugin (``-p hf_force_aspd``, with ``.ci`` on ``PYTHONPATH``): every transformers model that would run
``"sdpa"`` runs ``attn_implementation="aspd"`` instead -- the default (no implementation asked for) and an explicit
``"sdpa"`` alike, so transformers' ``*_matches_sdpa_*`` tests compare aspd against eager. ``"eager"`` and the
flash implementations are left alone. Used by ``.ci/hf_model_tests.sh``."""
from __future__ import annotations

import aspd_kernels.hf as ah
from transformers import modeling_utils

_check = modeling_utils.PreTrainedModel._check_and_adjust_attn_implementation


def _aspd_for_sdpa(self, attn_implementation, *args, **kwargs):
    chosen = _check(self, attn_implementation, *args, **kwargs)
    return ah.NAME if chosen == "sdpa" else chosen


modeling_utils.PreTrainedModel._check_and_adjust_attn_implementation = _aspd_for_sdpa


def pytest_report_header(config):
    return 'hf_force_aspd: "sdpa" (and the default attention) replaced by attn_implementation="aspd"'
