"""radlogics_repro: an open reproduction of the RADLogics COVID-19 chest-CT pipeline.

Research use only, not for clinical diagnosis.
"""

import os as _os

# TensorFlow's C++ INFO lines (oneDNN and CPU-feature banners) on every start hide the messages
# that matter; warnings and errors still show. A value the user set is kept.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"

RESEARCH_USE_NOTICE = "Research use only, not for clinical diagnosis."
