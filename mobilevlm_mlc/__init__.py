"""mobilevlm-mlc: MobileVLM compiled with Apache TVM, run from Python."""

__version__ = "0.1.0"
