"""MobileVLM redefined in TVM Relax `nn` modules (`mobilevlm`, `llama`, `clip`, `projector`), its
configuration (`config`), checkpoint naming (`weights`) and quantization (`quantization`).

Nothing is imported here: `config` is read by the runtime, which must not pay for Relax's frontend."""
