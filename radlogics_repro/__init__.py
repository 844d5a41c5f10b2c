"""radlogics_repro: an open reproduction of the RADLogics COVID-19 chest-CT pipeline.

Research use only, not for clinical diagnosis.
"""

__version__ = "0.1.0"

RESEARCH_USE_NOTICE = "Research use only, not for clinical diagnosis."
